"""The real `Runtime`: containerd over its gRPC API, runc (or gVisor's runsc) underneath.

Create is what the Go client does, in the fewest calls: read the image's config from the
content store (cached by manifest digest, so a warm create reads nothing), create the container
record (which pins its snapshot against garbage collection), prepare the snapshot on the image's
chain id, create the task with the snapshot's mounts and a `binary://` stdout/stderr URI naming
`fsb-logger` (the shim starts it and hands it both pipes; it writes the capped, per-stream CRI
log, so output never depends on the agent staying alive; without the logger, `file://`), start
it. A failure part-way removes what was made before raising: no half-created container is left.

The rest lives beside this module, one collaborator each: images and pulls
(`containerd_images.py`), claiming warm slots (`containerd_warm.py`, with `claim_records.py`),
delete and the cleanup of a failed create (`containerd_removal.py`), and reading a container's
state (`container_state.py`).

gVisor: Debian ships no runsc shim, so gVisor runs through the runc v2 shim with `BinaryName`
pointing at a wrapper (`runsc_wrapper.py`) that adds runsc's `--network=host` and starts runsc
inside the network namespace the spec names, so a gVisor sandbox gets the same private namespace
as a runc one. The wrapper is written once under `state_dir`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote, urlencode

from google.protobuf import any_pb2

from fastsandbox._aio.keyed import KeyedLocks
from fastsandbox.agent.runtime import runsc_wrapper
from fastsandbox.agent.runtime._containerd_api import ContainerdApi
from fastsandbox.agent.runtime.apparmor import AppArmor
from fastsandbox.agent.runtime.base import (
    ContainerSpec,
    ContainerState,
    ImageInfo,
    MainProcess,
    ProcessDefaults,
)
from fastsandbox.agent.runtime.claim_records import ClaimRecords
from fastsandbox.agent.runtime.container_state import (
    label_selector,
    process_defaults_of,
    state_of,
)
from fastsandbox.agent.runtime.containerd_images import ContainerdImages
from fastsandbox.agent.runtime.containerd_removal import CleanupRetries, remove_container
from fastsandbox.agent.runtime.containerd_warm import WarmSlots
from fastsandbox.agent.runtime.disk import TASK_BUNDLES, WritableLayers
from fastsandbox.agent.runtime.image_config import ImageConfig, merge_process, parse_user
from fastsandbox.agent.runtime.oci_spec import (
    DEFAULT_PIDS_LIMIT,
    build_oci_spec,
    host_pids_limit,
)
from fastsandbox.api import labels
from fastsandbox.api._proto.fastsandbox.v1 import containerd_subset_pb2 as pb
from fastsandbox.api.images import PullCredentials, normalize_image_ref
from fastsandbox.errors import AlreadyExists, InvalidArgument, NotFound

log = logging.getLogger(__name__)

MANAGED_LABEL = labels.MANAGED_LABEL
RUNC_SHIM = "io.containerd.runc.v2"
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
RUNC_OPTIONS_TYPE_URL = "containerd.runc.v1.Options"
# Containers whose spec carries the same value share one runc v2 shim process.
SHIM_GROUP_ANNOTATION = "io.containerd.runc.v2.group"

# Where a container's size-limited writable layer lives (`disk.py`), so whoever removes the
# container (its agent, the janitor) finds it from the record alone.
DISK_LAYER_LABEL = labels.DISK_LAYER_LABEL


def log_uri(spec: ContainerSpec) -> str:
    """The task's stdout/stderr URI (the shim reads one URI for both streams). `binary://` runs
    the logger with the query's pairs as its arguments: `path P max-bytes N`."""
    if spec.logger_path is None:
        return Path(spec.log_path).as_uri()
    query = urlencode({"path": spec.log_path, "max-bytes": str(spec.log_max_bytes)})
    return f"binary://{quote(spec.logger_path)}?{query}"


class _Exists(Exception):
    """The container record exists already (`_create` made nothing)."""


class ContainerdRuntime:
    """`Runtime` on containerd. `socket` is containerd's gRPC socket; containers live in
    `namespace`; registries in `insecure_registries` (host:port) are pulled over plain HTTP."""

    def __init__(
        self,
        socket: str | Path,
        namespace: str = "fastsandbox",
        insecure_registries: Sequence[str] = (),
        ctr_binary: str = "ctr",
        *,
        snapshotter: str = "overlayfs",
        hosts_dir: str | Path | None = None,
        state_dir: str | Path | None = None,
        runsc_binary: str = "runsc",
        pull_timeout: float = 900.0,
        shim_group: str | None = None,
        apparmor: AppArmor | None = None,
        containerd_state: Path | None = None,
        spare_layers: int = 0,
    ) -> None:
        self.socket = str(socket)
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.state_dir = Path(state_dir) if state_dir else Path("/run/fastsandbox")
        self.runsc_binary = runsc_binary
        self.shim_group = shim_group
        self._api = ContainerdApi(self.socket, namespace)
        self._images = ContainerdImages(
            self._api,
            self.socket,
            namespace,
            snapshotter=snapshotter,
            insecure_registries=insecure_registries,
            ctr_binary=ctr_binary,
            hosts_dir=str(hosts_dir) if hosts_dir else None,
            pull_timeout=pull_timeout,
        )
        self._id_locks = KeyedLocks()
        self._gvisor_wrapper: str | None = None
        self.apparmor = apparmor or AppArmor()
        # Removals of what a failed create left, retried while containerd does not answer.
        self._cleanups = CleanupRetries(self._remove_locked)
        # containerd's state dir known: its shim mounts each sandbox's size-limited layer, so
        # the agent needs no mount privilege (agent/runtime/disk.py; a Kubernetes agent Pod).
        bundles = containerd_state / TASK_BUNDLES / namespace if containerd_state else None
        # `spare_layers` formatted layer images per size kept ready (spare_layers.py).
        self._layers = WritableLayers(
            self.state_dir / "disks", bundle_root=bundles, spares=spare_layers
        )
        # Claimed slots' records: journalled before a claim is answered, written after.
        self._claims = ClaimRecords(
            self._api, self.state_dir / "claims", f"{self.socket}|{namespace}"
        )
        self._warm = WarmSlots(self._api, self._images, self._claims)

    # -- images -------------------------------------------------------------------------------

    async def pull(self, image: str, credentials: PullCredentials | None = None) -> ImageInfo:
        return await self._images.pull(image, credentials)

    async def registry_allows(self, image: str, credentials: PullCredentials | None) -> bool:
        return await self._images.registry_allows(image, credentials)

    async def images(self) -> list[ImageInfo]:
        return await self._images.present()

    async def image_config(self, ref: str) -> ImageConfig:
        """The process defaults and chain id of a pulled image (NotFound when not pulled)."""
        return await self._images.config(ref)

    # -- create -------------------------------------------------------------------------------

    def _gvisor_binary(self) -> str:
        if self._gvisor_wrapper is None:
            self._gvisor_wrapper = runsc_wrapper.install(self.state_dir, self.runsc_binary)
        return str(self._gvisor_wrapper)

    def _runtime_options(self, runtime: str) -> any_pb2.Any | None:
        if runtime == "runc":
            return None
        if runtime == "gvisor":
            options = pb.CtdRuncOptions(binary_name=self._gvisor_binary())
            return any_pb2.Any(type_url=RUNC_OPTIONS_TYPE_URL, value=options.SerializeToString())
        raise InvalidArgument(f"runtime {runtime!r} is not one of runc, gvisor")

    async def create(self, spec: ContainerSpec) -> ContainerState:
        async with self._id_locks.hold(spec.id):
            try:
                # A create in flight: spare layers are not made meanwhile (spare_layers.py).
                with self._layers.spares.busy():
                    return await self._create(spec)
            except _Exists:
                # A retried create (or the id taken): what exists is the answer. No Get
                # before the create: one round trip fewer on every create that is new.
                return await self.get(spec.id)

    async def _create(self, spec: ContainerSpec) -> ContainerState:
        if not Path(spec.log_path).is_absolute():
            raise InvalidArgument(f"log path {spec.log_path!r} must be absolute")
        ref = normalize_image_ref(spec.image)
        options = self._runtime_options(spec.runtime)
        image = await self._images.config(ref)
        argv, env, cwd = merge_process(spec, image)
        if spec.warm:
            argv = []  # the claim names the command
        elif not argv and not spec.init_path:
            raise InvalidArgument(f"image {ref} has no entrypoint or cmd: give a command")
        uid, gid = parse_user(image.user)
        if self.apparmor.pending(spec.runtime):
            await asyncio.to_thread(self.apparmor.profile_for, spec.runtime)
        profile = self.apparmor.profile_for(spec.runtime)
        oci = build_oci_spec(
            container_id=spec.id,
            args=argv,
            env=env,
            cwd=cwd,
            uid=uid,
            gid=gid,
            cgroups_path=f"{spec.cgroup_parent.rstrip('/')}/{spec.id}",
            netns_path=spec.netns_path,
            netns_hook=spec.netns_hook,
            cpu_millis=spec.cpu_millis,
            memory_bytes=spec.memory_bytes,
            pids_limit=host_pids_limit(spec.pids_limit or DEFAULT_PIDS_LIMIT, spec.runtime),
            init_path=spec.init_path,
            channel_dir=spec.channel_dir,
            init_env=[f"{k}={v}" for k, v in spec.init_env],
            warm=spec.warm,
            annotations={SHIM_GROUP_ANNOTATION: self.shim_group} if self.shim_group else None,
            apparmor_profile=profile,
        )
        if spec.runtime == "gvisor":
            oci = runsc_wrapper.annotate(oci)  # the wrapper's front reads the netns with sed
        record_labels = {**spec.labels, MANAGED_LABEL: "true"}
        # Ours, never the caller's: remove acts on the path it names.
        record_labels.pop(DISK_LAYER_LABEL, None)
        if spec.disk_bytes is not None:
            record_labels[DISK_LAYER_LABEL] = str(self._layers.root)
        container = pb.CtdContainer(
            id=spec.id,
            labels=record_labels,
            image=ref,
            runtime=pb.CtdContainer.Runtime(name=RUNC_SHIM, options=options),
            spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=json.dumps(oci).encode()),
            snapshotter=self.snapshotter,
            snapshot_key=spec.id,
        )
        # The container record first: it references the snapshot key, which keeps the
        # snapshot safe from containerd's garbage collector from the moment it exists.
        # The record containerd stored (its labels, created time) is the state's container
        # half: no Get after the start, one round trip fewer on every create.
        try:
            stored = await self._api.create_container(container)
        except AlreadyExists:
            raise _Exists from None
        try:
            mounts = await self._rootfs(spec, image.chain_id)
            uri = log_uri(spec)
            Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
            created = await self._api.create_task(
                pb.CtdCreateTaskRequest(
                    container_id=spec.id,
                    rootfs=mounts,
                    stdout=uri,
                    stderr=uri,
                    options=options,
                )
            )
            await self._api.start_task(spec.id)
        except BaseException:
            log.warning("create failed; removing what was made", extra={"sandbox": spec.id})
            try:
                await asyncio.shield(self._remove(spec.id, grace_seconds=0))
            except Exception as exc:
                # The create's own error is the one to report. containerd itself may be what
                # failed (restarting): try again once it is back, so no container is left for
                # the janitor's orphan timeout.
                log.warning(
                    "cleanup after a failed create failed; retrying in the background",
                    extra={"sandbox": spec.id, "err": str(exc)},
                )
                self._cleanups.start(spec.id)
            raise
        log.info("started container", extra={"sandbox": spec.id, "pid": created.pid})
        if spec.warm:
            self._warm.made(spec.id, (container, oci, image, created.pid))
        # Start answered: the task is running with the pid Create gave. No Get to learn what
        # we know (a process that exits at once is seen stopped by the next `get`).
        task = pb.CtdProcess(
            id=spec.id, container_id=spec.id, pid=created.pid, status=pb.CTD_TASK_STATUS_RUNNING
        )
        return state_of(stored if stored.id else container, task)

    async def _rootfs(self, spec: ContainerSpec, chain_id: str) -> list[pb.CtdMount]:
        """The task's rootfs mounts: the snapshot, and the size-limited layer made beside its
        Prepare (the two do not depend on each other; each cleans up after itself and
        `_remove` takes whatever was made)."""
        if spec.disk_bytes is None:
            return await self._prepare_snapshot(spec.id, chain_id)
        try:
            # Both finish (or clean up after themselves) before this goes on.
            async with asyncio.TaskGroup() as tg:
                snapshot = tg.create_task(self._prepare_snapshot(spec.id, chain_id))
                layer = tg.create_task(self._layers.make(spec.id, spec.disk_bytes))
        except BaseExceptionGroup as group:
            # The caller's `except NotFound` (an image pruned) sees the error itself.
            raise group.exceptions[0] from None
        return self._layers.rootfs(spec.id, snapshot.result(), layer.result())

    async def _prepare_snapshot(self, key: str, parent: str) -> list[pb.CtdMount]:
        try:
            return await self._api.prepare_snapshot(self.snapshotter, key, parent)
        except NotFound as err:
            raise NotFound(
                f"{err.message} (the image's layers are not unpacked for snapshotter "
                f"{self.snapshotter}: pull it again)"
            ) from None
        except AlreadyExists:
            # A snapshot left by an interrupted delete: it belongs to no container (ours was
            # just created), so it is stale; replace it.
            await self._api.remove_snapshot(self.snapshotter, key)
            return await self._api.prepare_snapshot(self.snapshotter, key, parent)

    # -- warm slots ---------------------------------------------------------------------------

    async def claim(
        self,
        container_id: str,
        spec: ContainerSpec,
        start: Callable[[MainProcess], Awaitable[None]],
    ) -> ContainerState:
        async with self._id_locks.hold(container_id):
            return await self._warm.claim(container_id, spec, start)

    # -- delete -------------------------------------------------------------------------------

    async def delete(self, container_id: str, grace_seconds: float) -> bool:
        async with self._id_locks.hold(container_id):
            return await self._remove(container_id, grace_seconds)

    async def _remove(self, container_id: str, grace_seconds: float) -> bool:
        self._warm.forget(container_id)
        await self._claims.settle(container_id)
        return await remove_container(
            self._api, self.snapshotter, self._layers, container_id, grace_seconds
        )

    async def _remove_locked(self, container_id: str) -> None:
        """One removal of what a failed create left (`CleanupRetries`)."""
        async with self._id_locks.hold(container_id):
            await self._remove(container_id, grace_seconds=0)

    # -- state --------------------------------------------------------------------------------

    async def get(self, container_id: str) -> ContainerState:
        await self._claims.replay()
        container = await self._api.get_container(container_id)
        task: pb.CtdProcess | None = None
        with contextlib.suppress(NotFound):
            task = await self._api.get_task(container_id)
        return self._claims.overlay(state_of(container, task))

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerState]:
        await self._claims.replay()
        selector = label_selector({MANAGED_LABEL: "true", **(labels or {})})
        containers, tasks = await asyncio.gather(
            self._api.list_containers([selector]), self._api.list_tasks()
        )
        # containerd fills `id` (not `container_id`) for init processes in List.
        by_id = {t.container_id or t.id: t for t in tasks}
        states = (self._claims.overlay(state_of(c, by_id.get(c.id))) for c in containers)
        return sorted(states, key=lambda s: s.id)

    async def process_defaults(self, container_id: str) -> ProcessDefaults:
        recording = self._claims.process(container_id)
        if recording is not None:
            return process_defaults_of(recording)
        await self._claims.replay()
        container = await self._api.get_container(container_id)
        try:
            spec = json.loads(container.spec.value or b"{}")
        except ValueError:
            spec = {}
        return process_defaults_of(spec)

    async def close(self) -> None:
        await self._layers.close()
        await self._claims.close()
        await self._cleanups.close()
        await self._api.close()
