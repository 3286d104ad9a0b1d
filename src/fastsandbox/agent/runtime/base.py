"""The `Runtime` seam: what an agent needs from a container runtime, and nothing more.

The containerd backend (`containerd.py`) is the real one; `fake.py` is an in-memory twin for unit
tests. Both pass `tests/contract/test_runtime_contract.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from fastsandbox.api.images import PullCredentials
from fastsandbox.api.models import DEFAULT_LOG_MAX_BYTES


class ContainerStatus(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """Everything needed to start one sandbox container. Empty command/args/env/working_dir
    mean "take the image's entrypoint, cmd, env and workdir"."""

    id: str
    image: str
    log_path: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    # Path of the network namespace to join (e.g. /var/run/netns/fsb-agent-1); None = host.
    netns_path: str | None = None
    # argv of an OCI `createRuntime` hook that wires a network namespace runc makes for this
    # container (a private network inside a Kubernetes agent Pod: agent/network/hook.py).
    # Only without `netns_path`; the hook runs on the host, in the runtime's namespaces.
    netns_hook: tuple[str, ...] = ()
    # cgroup path under which the container's cgroup is made, e.g. "/fastsandbox/agent-1".
    cgroup_parent: str = "/fastsandbox"
    cpu_millis: int | None = None
    memory_bytes: int | None = None
    # None: the runtime's default pids limit (there is always one).
    pids_limit: int | None = None
    # "runc" or "gvisor".
    runtime: str = "runc"
    # Host path of `fsb-supervisor`: mounted read-only at /.fsb/init and run as PID 1 in front of
    # the sandbox's command (signals, reaping, exec/files). None: the command is PID 1.
    init_path: str | None = None
    # Host directory of the sandbox's supervisor channel, mounted read-only at /.fsb/run (only
    # with `init_path`), and the environment PID 1 gets on top of the process env to dial it.
    channel_dir: str | None = None
    init_env: tuple[tuple[str, str], ...] = ()
    # Cap of the captured stdout + stderr in bytes (`fsb-logger` keeps the newest).
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    # Host path of `fsb-logger`, containerd's `binary://` log driver; None: `file://` (streams
    # mixed, no cap, no timestamps).
    logger_path: str | None = None
    # Size limit of the writable layer in bytes (a file system of its own: writes past it fail
    # with ENOSPC inside); None: no limit beyond the host's disk (only runtime-level callers:
    # the agent always passes one).
    disk_bytes: int | None = None
    # A warm slot: the supervisor starts with `--warm` and waits for `start_main` (the spec's
    # command is not run; `claim` later names the sandbox's). Needs `init_path` + `channel_dir`.
    warm: bool = False


@dataclass(frozen=True, slots=True)
class ContainerState:
    id: str
    status: ContainerStatus
    labels: Mapping[str, str] = field(default_factory=dict)
    pid: int = 0
    exit_code: int | None = None
    started_at: float | None = None
    exited_at: float | None = None
    # Set when the runtime knows why the process ended, e.g. "OOMKilled".
    reason: str = ""
    # Only in the state a create returns: milliseconds it waited for the image to be pulled.
    pulled_ms: float = 0.0
    # Only in the state a create returns: it claimed a warm slot.
    warm: bool = False


@dataclass(frozen=True, slots=True)
class MainProcess:
    """What a claimed warm slot's supervisor starts (`start_main`): the argv, env and cwd a
    cold container of the same spec would have run (image defaults merged with the spec's),
    the user ("" = the container's own, the image's) and the hostname a cold container of the
    sandbox would have ("" = leave it; the supervisor sets it from inside the sandbox)."""

    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    user: str = ""
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class ProcessDefaults:
    """What a process started later in the sandbox inherits: the sandbox's own environment
    (image env merged with the sandbox's), working directory and user ("uid:gid", "" = root)."""

    env: tuple[str, ...]
    cwd: str
    user: str = ""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    name: str
    digest: str


class Runtime(Protocol):
    async def pull(self, image: str, credentials: PullCredentials | None = None) -> ImageInfo:
        """Make `image` available locally (no-op when already present), authenticating to its
        registry with `credentials` when given."""
        ...

    async def registry_allows(self, image: str, credentials: PullCredentials | None) -> bool:
        """Whether `image`'s registry would serve it to `credentials` (None: to anyone)."""
        ...

    async def images(self) -> list[ImageInfo]:
        """Images present locally."""
        ...

    async def create(self, spec: ContainerSpec) -> ContainerState:
        """Create and start the container. Idempotent: an existing container with the same id
        is returned as it is. The image must have been pulled (`NotFound` otherwise)."""
        ...

    async def claim(
        self,
        container_id: str,
        spec: ContainerSpec,
        start: Callable[[MainProcess], Awaitable[None]],
    ) -> ContainerState:
        """Turn warm container `container_id` into the sandbox `spec` describes (`spec.id` is
        the sandbox id; the container keeps its own id): give it the spec's limits and hostname,
        call `start(main)` to start its main process, then record the spec's labels, process
        and limits on the container (so recovery and `process_defaults` read what runs).
        `NotFound` when the container is gone; `FailedPrecondition` when it is not a warm one."""
        ...

    async def delete(self, container_id: str, grace_seconds: float) -> bool:
        """SIGTERM, wait up to `grace_seconds`, SIGKILL; then remove task, container and
        snapshot. Returns False when nothing existed (idempotent)."""
        ...

    async def get(self, container_id: str) -> ContainerState:
        """The container's state; raises `fastsandbox.errors.NotFound` when unknown."""
        ...

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerState]:
        """Containers whose labels include every given pair."""
        ...

    async def process_defaults(self, container_id: str) -> ProcessDefaults:
        """The env, cwd and user the container's main process was given (its PID 1's own
        channel variables left out); `NotFound` when unknown."""
        ...

    async def close(self) -> None: ...
