"""Removing a container from containerd: what the containerd runtime's delete does, and the
background retries that remove what a failed create left.

Delete: SIGTERM to every process, wait up to the grace period, SIGKILL, then remove task,
container and snapshot; each step tolerates "not found", so delete is idempotent and also
cleans up after a half-finished create or delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastsandbox.agent.runtime._containerd_api import ContainerdApi
from fastsandbox.agent.runtime.disk import WritableLayers
from fastsandbox.api import labels
from fastsandbox.api._proto.fastsandbox.v1 import containerd_subset_pb2 as pb
from fastsandbox.errors import NotFound, RuntimeFailure

log = logging.getLogger(__name__)

# SIGKILL cannot be ignored; this only bounds a wait on a wedged shim.
KILL_WAIT_SECONDS = 10.0
# Background removals of a failed create's leftovers: 0.5 s doubling to 10 s, about 2 minutes.
_CLEANUP_ATTEMPTS = 15


async def remove_container(
    api: ContainerdApi,
    snapshotter: str,
    layers: WritableLayers,
    container_id: str,
    grace_seconds: float,
) -> bool:
    """Stop the container's task (`stop_task`), then remove task, container, snapshot and its
    size-limited layer (under `layers`, or where its record's label names). False when none of
    them existed."""
    existed = await stop_task(api, container_id, grace_seconds)
    with contextlib.suppress(NotFound):
        record = await api.get_container(container_id)
        root = record.labels.get(labels.DISK_LAYER_LABEL)
        if root and Path(root).is_absolute():
            layers = WritableLayers(Path(root))
    with contextlib.suppress(NotFound):
        await api.delete_task(container_id)
        existed = True
    with contextlib.suppress(NotFound):
        await api.delete_container(container_id)
        existed = True
    with contextlib.suppress(NotFound):
        await api.remove_snapshot(snapshotter, container_id)
        existed = True
    # After the task: its overlay (the layer's only user) is unmounted with it.
    if await layers.remove(container_id):
        existed = True
    if existed:
        log.info("removed container", extra={"sandbox": container_id})
    return existed


async def stop_task(api: ContainerdApi, container_id: str, grace_seconds: float) -> bool:
    """SIGTERM, grace, SIGKILL. False when there is no task at all."""
    try:
        task = await api.get_task(container_id)
    except NotFound:
        return False
    if task.status == pb.CTD_TASK_STATUS_STOPPED:
        return True
    if grace_seconds > 0:
        await _kill(api, container_id, signal.SIGTERM)
        if await api.wait(container_id, timeout=grace_seconds) is not None:
            return True
    refused = await _kill(api, container_id, signal.SIGKILL)
    if await api.wait(container_id, timeout=KILL_WAIT_SECONDS) is None:
        why = f" (the kill failed: {refused.message})" if refused else ""
        raise RuntimeFailure(
            f"container {container_id} did not exit {KILL_WAIT_SECONDS:.0f}s after SIGKILL{why}"
        )
    return True


async def _kill(api: ContainerdApi, container_id: str, sig: int) -> RuntimeFailure | None:
    """Signal every process of the task. A refusal is returned, not raised: the wait that
    follows decides. runsc refuses a kill of a sandbox already on its way out ("connecting to
    control server ... connection refused"), and that sandbox then exits by itself."""
    try:
        await api.kill(container_id, sig, all_processes=True)
    except NotFound:
        pass
    except RuntimeFailure as exc:
        log.debug("kill refused", extra={"sandbox": container_id, "signal": sig, "err": str(exc)})
        return exc
    return None


class CleanupRetries:
    """Removals of what a failed create left, retried in the background while containerd does
    not answer (so no container is left for the janitor's orphan timeout). `remove(id)` is one
    attempt, taking whatever lock the container's other operations take."""

    def __init__(self, remove: Callable[[str], Awaitable[object]]) -> None:
        self._remove = remove
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, container_id: str) -> None:
        task = asyncio.create_task(
            self._remove_until_gone(container_id), name=f"cleanup-{container_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _remove_until_gone(self, container_id: str) -> None:
        delay = 0.5
        for _ in range(_CLEANUP_ATTEMPTS):
            await asyncio.sleep(delay)
            try:
                await self._remove(container_id)
            except Exception as exc:
                log.debug("cleanup retry failed", extra={"sandbox": container_id, "err": str(exc)})
                delay = min(delay * 2, 10.0)
                continue
            log.info("removed what a failed create left", extra={"sandbox": container_id})
            return
        log.warning(
            "cleanup retries exhausted; the janitor removes it", extra={"sandbox": container_id}
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
