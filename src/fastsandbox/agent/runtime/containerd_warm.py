"""Warm slots on containerd: the warm containers this runtime made, and claiming one for a
sandbox (its limits given, its main process started, its record journalled). What a claim
changes and why is in `warm_claim.py`; how its record is made durable, `claim_records.py`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastsandbox.agent.runtime._containerd_api import ContainerdApi
from fastsandbox.agent.runtime.base import (
    ContainerSpec,
    ContainerState,
    ContainerStatus,
    MainProcess,
)
from fastsandbox.agent.runtime.claim_records import Claimed, ClaimRecords
from fastsandbox.agent.runtime.containerd_images import ContainerdImages
from fastsandbox.agent.runtime.image_config import ImageConfig, merge_process
from fastsandbox.agent.runtime.oci_spec import (
    DEFAULT_PIDS_LIMIT,
    MAX_HOSTNAME,
    host_pids_limit,
    linux_resources,
)
from fastsandbox.agent.runtime.warm_claim import limits_fixed
from fastsandbox.api import labels
from fastsandbox.api._proto.fastsandbox.v1 import containerd_subset_pb2 as pb
from fastsandbox.errors import FailedPrecondition, InvalidArgument

# A warm container's record, its OCI spec parsed, its image's config and its task's pid.
WarmSlot = tuple[pb.CtdContainer, dict[str, Any], ImageConfig, int]
# What starts a claimed slot's main process (the supervisor's `start_main`).
StartMain = Callable[[MainProcess], Awaitable[None]]


class WarmSlots:
    """Claims warm containers of containerd (over `api`); their records are journalled in
    `claims`. The caller holds the container's lock around `claim`."""

    def __init__(self, api: ContainerdApi, images: ContainerdImages, claims: ClaimRecords) -> None:
        self._api = api
        self._images = images
        self._claims = claims
        # Warm containers this process made: their record, its OCI spec parsed, image config
        # and task pid, so a claim reads (and decodes) nothing before it starts the main process.
        self._made: dict[str, WarmSlot] = {}

    def made(self, container_id: str, slot: WarmSlot) -> None:
        """Warm container `container_id` was just made and started."""
        self._made[container_id] = slot

    def forget(self, container_id: str) -> None:
        self._made.pop(container_id, None)

    async def claim(
        self, container_id: str, spec: ContainerSpec, start: StartMain
    ) -> ContainerState:
        """`Runtime.claim`, the container's lock held."""
        container, oci, image, pid = await self._slot(container_id)
        argv, env, cwd = merge_process(spec, image)
        if not argv:
            raise InvalidArgument(f"image {spec.image} has no entrypoint or cmd: give a command")
        resources = linux_resources(
            spec.cpu_millis,
            spec.memory_bytes,
            host_pids_limit(spec.pids_limit or DEFAULT_PIDS_LIMIT, spec.runtime),
        )
        if (oci.get("linux") or {}).get("resources") != resources:
            if limits_fixed(spec.runtime):
                raise FailedPrecondition(
                    f"warm slot {container_id} was made with other limits, and "
                    f"{spec.runtime} cannot change a running sandbox's"
                )
            # Before the user's process exists: it starts inside the request's limits.
            await self._api.update_task(container_id, resources)
        main = MainProcess(
            argv=tuple(argv), env=tuple(env), cwd=cwd, hostname=spec.id[:MAX_HOSTNAME]
        )
        await start(main)
        # Recorded only once the main process runs: a claim cut short before this still
        # reads as a warm slot, which a restarted agent removes (never as a sandbox that
        # runs nothing). Journalled now, written to containerd after the answer
        # (claim_records.py).
        new_labels = {**spec.labels, labels.MANAGED_LABEL: "true"}
        new_labels.pop(labels.DISK_LAYER_LABEL, None)
        if labels.DISK_LAYER_LABEL in container.labels:
            # The slot's layer stays where it is: whoever removes the sandbox finds it here.
            new_labels[labels.DISK_LAYER_LABEL] = container.labels[labels.DISK_LAYER_LABEL]
        claim = Claimed(spec.id, argv, env, cwd, resources, new_labels)
        self._claims.begin(container, oci, claim)
        self._made.pop(container_id, None)
        return ContainerState(
            id=container_id,
            status=ContainerStatus.RUNNING,
            labels=new_labels,
            pid=pid,
            started_at=time.time(),
            warm=True,
        )

    async def _slot(self, container_id: str) -> WarmSlot:
        cached = self._made.get(container_id)
        if cached is not None:
            return cached
        # Made by an earlier agent process: read it back.
        container = await self._api.get_container(container_id)
        if labels.WARM_SLOT_LABEL not in container.labels:
            raise FailedPrecondition(f"container {container_id} is not a warm slot")
        task = await self._api.get_task(container_id)
        if task.status != pb.CTD_TASK_STATUS_RUNNING:
            raise FailedPrecondition(f"warm slot {container_id} is not running")
        image = await self._images.config(container.image)
        return container, json.loads(container.spec.value or b"{}"), image, task.pid
