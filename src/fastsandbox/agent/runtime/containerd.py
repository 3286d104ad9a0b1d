"""The real `Runtime`: containerd over its gRPC API, runc (or gVisor's runsc) underneath.

Create is what the Go client does, in the fewest calls: read the image's config from the
content store (cached by manifest digest, so a warm create reads nothing), create the container
record (which pins its snapshot against garbage collection), prepare the snapshot on the image's
chain id, create the task with the snapshot's mounts and a `binary://` stdout/stderr URI naming
`fsb-logger` (the shim starts it and hands it both pipes; it writes the capped, per-stream CRI
log, so output never depends on the agent staying alive; without the logger, `file://`), start
it. A failure part-way removes what was made before raising: no half-created container is left.

Pull: containerd 1.6 has no server-side Transfer service, so a pull is client work (resolve,
fetch every blob into the content store under a lease, unpack the layers into snapshots, write
the image record). Re-implementing that (registry auth, token refresh, mirrors, media types,
unpack) is a lot of code to get right; the CRI `PullImage` RPC would do it server-side but only
into namespace `k8s.io`. The simplest correct choice is containerd's own client: `ctr images
pull` (one subprocess per pull, off the hot path), with `--plain-http` for the registries named
insecure and `--hosts-dir` for mirrors and credentials. Concurrent pulls of one image run once.
Image names are normalised first (`busybox` → `docker.io/library/busybox:latest`), because ctr
stores exactly the name it is given.

Delete: SIGTERM to every process, wait up to the grace period, SIGKILL, then remove task,
container and snapshot; each step tolerates "not found", so delete is idempotent and also
cleans up after a half-finished create or delete.

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
import os
import platform
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from google.protobuf import any_pb2

from fastsandbox._aio.keyed import KeyedLocks
from fastsandbox.agent.runtime import registry_probe, runsc_wrapper
from fastsandbox.agent.runtime._containerd_api import ContainerdApi
from fastsandbox.agent.runtime.apparmor import AppArmor
from fastsandbox.agent.runtime.base import (
    ContainerSpec,
    ContainerState,
    ContainerStatus,
    ImageInfo,
    MainProcess,
    ProcessDefaults,
)
from fastsandbox.agent.runtime.claim_records import Claimed, ClaimRecords
from fastsandbox.agent.runtime.disk import TASK_BUNDLES, WritableLayers
from fastsandbox.agent.runtime.image_config import (
    ImageConfig,
    chain_id,
    merge_process,
    parse_user,
)
from fastsandbox.agent.runtime.oci_spec import (
    DEFAULT_PIDS_LIMIT,
    MAX_HOSTNAME,
    build_oci_spec,
    host_pids_limit,
    linux_resources,
)
from fastsandbox.agent.runtime.pull_errors import classify
from fastsandbox.agent.runtime.warm_claim import limits_fixed
from fastsandbox.api import labels
from fastsandbox.api._proto.fastsandbox.v1 import containerd_subset_pb2 as pb
from fastsandbox.api.images import PullCredentials, normalize_image_ref, registry_host
from fastsandbox.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RuntimeFailure,
)

log = logging.getLogger(__name__)

MANAGED_LABEL = labels.MANAGED_LABEL
WARM_SLOT_LABEL = labels.WARM_SLOT_LABEL
RUNC_SHIM = "io.containerd.runc.v2"
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
RUNC_OPTIONS_TYPE_URL = "containerd.runc.v1.Options"
# Containers whose spec carries the same value share one runc v2 shim process.
SHIM_GROUP_ANNOTATION = "io.containerd.runc.v2.group"
# SIGKILL cannot be ignored; this only bounds a wait on a wedged shim.
KILL_WAIT_SECONDS = 10.0
_STDERR_TAIL = 2000

# Where a container's size-limited writable layer lives (`disk.py`), so whoever removes the
# container (its agent, the janitor) finds it from the record alone.
DISK_LAYER_LABEL = labels.DISK_LAYER_LABEL
SIGKILL_EXIT = 128 + signal.SIGKILL
CGROUP_ROOT = Path("/sys/fs/cgroup")


def log_uri(spec: ContainerSpec) -> str:
    """The task's stdout/stderr URI (the shim reads one URI for both streams). `binary://` runs
    the logger with the query's pairs as its arguments: `path P max-bytes N`."""
    if spec.logger_path is None:
        return Path(spec.log_path).as_uri()
    query = urlencode({"path": spec.log_path, "max-bytes": str(spec.log_max_bytes)})
    return f"binary://{quote(spec.logger_path)}?{query}"


def _cgroups_path(container: pb.CtdContainer) -> str:
    try:
        spec = json.loads(container.spec.value or b"{}")
    except ValueError:
        return ""
    path = spec.get("linux", {}).get("cgroupsPath", "")
    return path if isinstance(path, str) else ""


def oom_killed(cgroups_path: str, root: Path = CGROUP_ROOT) -> bool:
    """Whether the kernel's OOM killer struck in this cgroup (v1 `memory.oom_control`, v2
    `memory.events`). The cgroup lives until the task is deleted, so a stopped sandbox can still
    tell why its process got SIGKILL."""
    rel = cgroups_path.strip("/")
    if not rel:
        return False
    candidates = [
        (root / "memory" / rel / "memory.oom_control", "oom_kill"),
        (root / rel / "memory.events", "oom_kill"),
        (root / "unified" / rel / "memory.events", "oom_kill"),
    ]
    for path, key in candidates:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit() and int(value) > 0:
                return True
    return False


_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

_TASK_STATUS = {
    pb.CTD_TASK_STATUS_CREATED: ContainerStatus.CREATED,
    pb.CTD_TASK_STATUS_RUNNING: ContainerStatus.RUNNING,
    pb.CTD_TASK_STATUS_STOPPED: ContainerStatus.STOPPED,
    pb.CTD_TASK_STATUS_PAUSED: ContainerStatus.RUNNING,
    pb.CTD_TASK_STATUS_PAUSING: ContainerStatus.RUNNING,
}


def platform_manifest(ref: str, index: Mapping[str, Any]) -> str:
    """The digest of this machine's linux manifest in an image index."""
    arch = _GOARCH.get(platform.machine(), platform.machine())
    for entry in index.get("manifests") or ():
        plat = entry.get("platform") or {}
        if plat.get("os") == "linux" and plat.get("architecture") == arch:
            return str(entry["digest"])
    raise NotFound(f"image {ref} has no linux/{arch} manifest")


def is_index(media_type: str, document: Mapping[str, Any]) -> bool:
    return media_type in _INDEX_TYPES or "manifests" in document


def _timestamp(ts: Any) -> float | None:
    seconds = float(ts.seconds) + ts.nanos / 1e9
    # containerd sends the zero time (year 1) for "never"; the Unix epoch is as meaningless.
    return seconds if seconds > 0 else None


# Background removals of a failed create's leftovers: 0.5 s doubling to 10 s, about 2 minutes.
_CLEANUP_ATTEMPTS = 15


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
    ) -> None:
        self.socket = str(socket)
        self.namespace = namespace
        self.insecure_registries = frozenset(insecure_registries)
        self.ctr_binary = ctr_binary
        self.snapshotter = snapshotter
        self.hosts_dir = str(hosts_dir) if hosts_dir else None
        self.state_dir = Path(state_dir) if state_dir else Path("/run/fastsandbox")
        self.runsc_binary = runsc_binary
        self.pull_timeout = pull_timeout
        self.shim_group = shim_group
        self._api = ContainerdApi(self.socket, namespace)
        self._pull_locks = KeyedLocks()
        self._id_locks = KeyedLocks()
        self._image_configs: dict[str, ImageConfig] = {}
        self._gvisor_wrapper: str | None = None
        self.apparmor = apparmor or AppArmor()
        # Removals of what a failed create left, retried while containerd does not answer.
        self._cleanups: set[asyncio.Task[None]] = set()
        # containerd's state dir known: its shim mounts each sandbox's size-limited layer, so
        # the agent needs no mount privilege (agent/runtime/disk.py; a Kubernetes agent Pod).
        bundles = containerd_state / TASK_BUNDLES / namespace if containerd_state else None
        self._layers = WritableLayers(self.state_dir / "disks", bundle_root=bundles)
        # Warm containers this process made: their record, its OCI spec parsed, image config
        # and task pid, so a claim reads (and decodes) nothing before it starts the main process.
        self._warm: dict[str, tuple[pb.CtdContainer, dict[str, Any], ImageConfig, int]] = {}
        # Claimed slots' records: journalled before a claim is answered, written after.
        self._claims = ClaimRecords(
            self._api, self.state_dir / "claims", f"{self.socket}|{namespace}"
        )

    # -- images -------------------------------------------------------------------------------

    async def pull(self, image: str, credentials: PullCredentials | None = None) -> ImageInfo:
        ref = normalize_image_ref(image)
        async with self._pull_locks.hold(ref):
            with contextlib.suppress(NotFound):
                img = await self._api.get_image(ref)
                # An interrupted pull can leave the image record without its unpacked layers;
                # then pull again (ctr skips what is already fetched and unpacks the rest).
                config = await self.image_config(ref)
                await self._api.stat_snapshot(self.snapshotter, config.chain_id)
                return ImageInfo(name=ref, digest=img.target.digest)
            await self._ctr_pull(ref, credentials)
            img = await self._api.get_image(ref)
            return ImageInfo(name=ref, digest=img.target.digest)

    async def registry_allows(self, image: str, credentials: PullCredentials | None) -> bool:
        ref = normalize_image_ref(image)
        plain = registry_host(ref) in self.insecure_registries
        return await registry_probe.allows(ref, credentials, plain_http=plain)

    def _pull_argv(self, ref: str, username: str | None = None) -> list[str]:
        argv = [self.ctr_binary, "-a", self.socket, "-n", self.namespace, "images", "pull"]
        if registry_host(ref) in self.insecure_registries:
            argv.append("--plain-http")
        if self.hosts_dir:
            argv += ["--hosts-dir", self.hosts_dir]
        if self.snapshotter:
            argv += ["--snapshotter", self.snapshotter]
        if username:
            # Only the user on argv: ctr asks for the password on its terminal (`_ctr_pull`).
            argv += ["--user", username]
        return [*argv, ref]

    async def _ctr_pull(self, ref: str, credentials: PullCredentials | None = None) -> None:
        argv = self._pull_argv(ref, credentials.username if credentials else None)
        started = time.monotonic()
        # The password never goes on argv (any local user reads /proc/*/cmdline) or into the
        # environment: ctr reads it from its console, here a pty only we hold the other end of.
        master, slave = os.openpty() if credentials else (-1, -1)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=slave if credentials else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            if credentials:
                os.close(master)
            raise RuntimeFailure(
                f"{self.ctr_binary} not found: install containerd (scripts/setup)"
            ) from None
        finally:
            if credentials:
                os.close(slave)
        try:
            if credentials:
                # Queued on the terminal's line until ctr reads it; kept open until ctr exits.
                os.write(master, credentials.password.encode() + b"\n")
            async with asyncio.timeout(self.pull_timeout):
                _, stderr_bytes = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeFailure(
                f"pull of {ref} timed out after {self.pull_timeout:.0f}s ({argv!r})"
            ) from None
        finally:
            if credentials:
                os.close(master)
        stderr = stderr_bytes.decode(errors="replace").strip()[-_STDERR_TAIL:]
        if proc.returncode != 0:
            # The remote's words stay in our log; the caller gets ours (pull_errors.py).
            log.debug("pull failed", extra={"image": ref, "argv": argv, "stderr": stderr})
            failure = classify(stderr, registry_host(ref))
            raise failure.kind(f"pull of {ref} failed: {failure.reason}")
        log.info("pulled image", extra={"image": ref, "ms": (time.monotonic() - started) * 1e3})

    async def images(self) -> list[ImageInfo]:
        return sorted(
            (ImageInfo(name=i.name, digest=i.target.digest) for i in await self._api.list_images()),
            key=lambda i: i.name,
        )

    async def _read_json(self, digest: str) -> dict[str, Any]:
        data = await self._api.read_content(digest)
        try:
            value = json.loads(data)
        except ValueError as err:
            raise RuntimeFailure(f"content {digest} is not JSON: {err}") from None
        if not isinstance(value, dict):
            raise RuntimeFailure(f"content {digest} is not a JSON object")
        return value

    async def image_config(self, ref: str) -> ImageConfig:
        """The process defaults and chain id of a pulled image (NotFound when not pulled)."""
        try:
            image = await self._api.get_image(ref)
        except NotFound:
            raise NotFound(f"image {ref} is not pulled on this node; pull it first") from None
        target = image.target
        cached = self._image_configs.get(target.digest)
        if cached is not None:
            return cached
        manifest = await self._read_json(target.digest)
        if is_index(target.media_type, manifest):
            manifest = await self._read_json(self._platform_manifest(ref, manifest))
        config_digest = manifest.get("config", {}).get("digest")
        if not config_digest:
            raise RuntimeFailure(f"image {ref}: manifest has no config")
        config = await self._read_json(config_digest)
        process = config.get("config") or {}
        result = ImageConfig(
            entrypoint=tuple(process.get("Entrypoint") or ()),
            cmd=tuple(process.get("Cmd") or ()),
            env=tuple(process.get("Env") or ()),
            working_dir=process.get("WorkingDir") or "",
            user=process.get("User") or "",
            chain_id=chain_id((config.get("rootfs") or {}).get("diff_ids") or ()),
        )
        self._image_configs[target.digest] = result
        return result

    @staticmethod
    def _platform_manifest(ref: str, index: Mapping[str, Any]) -> str:
        return platform_manifest(ref, index)

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
            with contextlib.suppress(NotFound):
                await self._api.get_container(spec.id)
                return await self.get(spec.id)
            return await self._create(spec)

    async def _create(self, spec: ContainerSpec) -> ContainerState:
        if not Path(spec.log_path).is_absolute():
            raise InvalidArgument(f"log path {spec.log_path!r} must be absolute")
        ref = normalize_image_ref(spec.image)
        options = self._runtime_options(spec.runtime)
        image = await self.image_config(ref)
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
        stored = await self._api.create_container(container)
        try:
            mounts = await self._prepare_snapshot(spec.id, image.chain_id)
            if spec.disk_bytes is not None:
                layer = await self._layers.make(spec.id, spec.disk_bytes)
                mounts = self._layers.rootfs(spec.id, mounts, layer)
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
                self._retry_removal(spec.id)
            raise
        log.info("started container", extra={"sandbox": spec.id, "pid": created.pid})
        if spec.warm:
            self._warm[spec.id] = (container, oci, image, created.pid)
        task: pb.CtdProcess | None = None
        with contextlib.suppress(NotFound):
            task = await self._api.get_task(spec.id)
        return self._state(stored if stored.id else container, task)

    # -- warm slots ---------------------------------------------------------------------------

    async def claim(
        self,
        container_id: str,
        spec: ContainerSpec,
        start: Callable[[MainProcess], Awaitable[None]],
    ) -> ContainerState:
        async with self._id_locks.hold(container_id):
            container, oci, image, pid = await self._warm_slot(container_id)
            argv, env, cwd = merge_process(spec, image)
            if not argv:
                raise InvalidArgument(
                    f"image {spec.image} has no entrypoint or cmd: give a command"
                )
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
            new_labels = {**spec.labels, MANAGED_LABEL: "true"}
            new_labels.pop(DISK_LAYER_LABEL, None)
            if DISK_LAYER_LABEL in container.labels:
                # The slot's layer stays where it is: whoever removes the sandbox finds it here.
                new_labels[DISK_LAYER_LABEL] = container.labels[DISK_LAYER_LABEL]
            claim = Claimed(spec.id, argv, env, cwd, resources, new_labels)
            self._claims.begin(container, oci, claim)
            self._warm.pop(container_id, None)
            return ContainerState(
                id=container_id,
                status=ContainerStatus.RUNNING,
                labels=new_labels,
                pid=pid,
                started_at=time.time(),
                warm=True,
            )

    async def _warm_slot(
        self, container_id: str
    ) -> tuple[pb.CtdContainer, dict[str, Any], ImageConfig, int]:
        cached = self._warm.get(container_id)
        if cached is not None:
            return cached
        # Made by an earlier agent process: read it back.
        container = await self._api.get_container(container_id)
        if WARM_SLOT_LABEL not in container.labels:
            raise FailedPrecondition(f"container {container_id} is not a warm slot")
        task = await self._api.get_task(container_id)
        if task.status != pb.CTD_TASK_STATUS_RUNNING:
            raise FailedPrecondition(f"warm slot {container_id} is not running")
        image = await self.image_config(container.image)
        return container, json.loads(container.spec.value or b"{}"), image, task.pid

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

    def _retry_removal(self, container_id: str) -> None:
        task = asyncio.create_task(
            self._remove_until_gone(container_id), name=f"cleanup-{container_id}"
        )
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _remove_until_gone(self, container_id: str) -> None:
        delay = 0.5
        for _ in range(_CLEANUP_ATTEMPTS):
            await asyncio.sleep(delay)
            try:
                async with self._id_locks.hold(container_id):
                    await self._remove(container_id, grace_seconds=0)
            except Exception as exc:
                log.debug("cleanup retry failed", extra={"sandbox": container_id, "err": str(exc)})
                delay = min(delay * 2, 10.0)
                continue
            log.info("removed what a failed create left", extra={"sandbox": container_id})
            return
        log.warning(
            "cleanup retries exhausted; the janitor removes it", extra={"sandbox": container_id}
        )

    # -- delete -------------------------------------------------------------------------------

    async def delete(self, container_id: str, grace_seconds: float) -> bool:
        async with self._id_locks.hold(container_id):
            return await self._remove(container_id, grace_seconds)

    async def _remove(self, container_id: str, grace_seconds: float) -> bool:
        self._warm.pop(container_id, None)
        await self._claims.settle(container_id)
        existed = await self._stop_task(container_id, grace_seconds)
        layers = self._layers
        with contextlib.suppress(NotFound):
            record = await self._api.get_container(container_id)
            root = record.labels.get(DISK_LAYER_LABEL)
            if root and Path(root).is_absolute():
                layers = WritableLayers(Path(root))
        with contextlib.suppress(NotFound):
            await self._api.delete_task(container_id)
            existed = True
        with contextlib.suppress(NotFound):
            await self._api.delete_container(container_id)
            existed = True
        with contextlib.suppress(NotFound):
            await self._api.remove_snapshot(self.snapshotter, container_id)
            existed = True
        # After the task: its overlay (the layer's only user) is unmounted with it.
        if await layers.remove(container_id):
            existed = True
        if existed:
            log.info("removed container", extra={"sandbox": container_id})
        return existed

    async def _stop_task(self, container_id: str, grace_seconds: float) -> bool:
        """SIGTERM, grace, SIGKILL. False when there is no task at all."""
        try:
            task = await self._api.get_task(container_id)
        except NotFound:
            return False
        if task.status == pb.CTD_TASK_STATUS_STOPPED:
            return True
        if grace_seconds > 0:
            with contextlib.suppress(NotFound):
                await self._api.kill(container_id, signal.SIGTERM, all_processes=True)
            if await self._api.wait(container_id, timeout=grace_seconds) is not None:
                return True
        with contextlib.suppress(NotFound):
            await self._api.kill(container_id, signal.SIGKILL, all_processes=True)
        if await self._api.wait(container_id, timeout=KILL_WAIT_SECONDS) is None:
            raise RuntimeFailure(
                f"container {container_id} did not exit {KILL_WAIT_SECONDS:.0f}s after SIGKILL"
            )
        return True

    # -- state --------------------------------------------------------------------------------

    @staticmethod
    def _state(container: pb.CtdContainer, task: pb.CtdProcess | None) -> ContainerState:
        labels = dict(container.labels)
        # containerd keeps no start time; the record is made a few ms before the task starts.
        created = _timestamp(container.created_at)
        if task is None:
            # A container without a task runs nothing (e.g. its node rebooted).
            return ContainerState(
                id=container.id,
                status=ContainerStatus.STOPPED,
                labels=labels,
                started_at=created,
                reason="NoTask",
            )
        status = _TASK_STATUS.get(task.status, ContainerStatus.UNKNOWN)
        stopped = status is ContainerStatus.STOPPED
        reason = ""
        if stopped and task.exit_status == SIGKILL_EXIT and oom_killed(_cgroups_path(container)):
            reason = "OOMKilled"
        return ContainerState(
            id=container.id,
            status=status,
            labels=labels,
            pid=0 if stopped else task.pid,
            exit_code=task.exit_status if stopped else None,
            started_at=created,
            exited_at=_timestamp(task.exited_at) if stopped else None,
            reason=reason,
        )

    async def get(self, container_id: str) -> ContainerState:
        await self._claims.replay()
        container = await self._api.get_container(container_id)
        task: pb.CtdProcess | None = None
        with contextlib.suppress(NotFound):
            task = await self._api.get_task(container_id)
        return self._claims.overlay(self._state(container, task))

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerState]:
        await self._claims.replay()
        wanted = {MANAGED_LABEL: "true", **(labels or {})}
        selector = ",".join(f"labels.{_quote(k)}=={_quote(v)}" for k, v in wanted.items())
        containers, tasks = await asyncio.gather(
            self._api.list_containers([selector]), self._api.list_tasks()
        )
        # containerd fills `id` (not `container_id`) for init processes in List.
        by_id = {t.container_id or t.id: t for t in tasks}
        states = (self._claims.overlay(self._state(c, by_id.get(c.id))) for c in containers)
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
        await self._claims.close()
        for task in self._cleanups:
            task.cancel()
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        await self._api.close()


def process_defaults_of(oci: Mapping[str, Any]) -> ProcessDefaults:
    """A sandbox's process env/cwd/user from its OCI spec, without PID 1's own FSB_* vars."""
    process = oci.get("process") or {}
    env = tuple(e for e in process.get("env") or () if not str(e).startswith("FSB_"))
    user = process.get("user") or {}
    uid, gid = int(user.get("uid", 0)), int(user.get("gid", 0))
    return ProcessDefaults(
        env=env, cwd=str(process.get("cwd") or "/"), user=f"{uid}:{gid}" if uid or gid else ""
    )


def _quote(value: str) -> str:
    """A quoted string in containerd's filter syntax (Go strconv quoting rules)."""
    return json.dumps(value)
