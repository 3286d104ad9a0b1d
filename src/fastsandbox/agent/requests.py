"""What the agent's manager takes and answers: the create request, a pull's result, the
agent's status, and the sandbox-id rules (a claimed warm slot's container keeps its own id, so
the API's sandbox id comes from its label)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from fastsandbox.agent.runtime.base import ContainerState, ContainerStatus, ImageInfo
from fastsandbox.agent.warm import WarmCounts
from fastsandbox.api.images import PullCredentials
from fastsandbox.api.labels import SANDBOX_ID_LABEL
from fastsandbox.errors import InvalidArgument

# containerd's own rule for ids; it also keeps ids safe to use as file names (no "/" or "..").
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,75}$")


@dataclass(frozen=True, slots=True)
class SandboxRequest:
    """What the control plane asks for; the gRPC layer builds it from `SandboxRuntimeSpec`."""

    sandbox_id: str
    image: str
    namespace: str = ""
    name: str = ""
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = ""
    exposed_ports: tuple[int, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    # 0 = no limit beyond the agent's.
    cpu_millis: int = 0
    memory_bytes: int = 0
    pids_limit: int = 0
    # Writable-layer size; 0 = the agent's default (never unlimited).
    disk_bytes: int = 0
    # Cap of the captured stdout + stderr; 0 = the agent's default.
    log_max_bytes: int = 0
    # Registry credentials of this create only: used to pull, and to prove access to an image
    # already cached here when it is private (image_access.py). Never stored.
    pull_credentials: PullCredentials | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class PullResult:
    image: ImageInfo
    seconds: float


@dataclass(frozen=True, slots=True)
class AgentStatus:
    sandboxes: list[ContainerState]
    images: list[ImageInfo]
    cordoned: bool = False
    # Slots counted against capacity, creates in flight included.
    used_slots: int = 0
    creating: int = 0
    warm: list[WarmCounts] = field(default_factory=list)


def check_id(sandbox_id: str) -> None:
    if not _ID.match(sandbox_id):
        raise InvalidArgument(
            f"sandbox_id {sandbox_id!r}: must be 1-76 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


def is_live(state: ContainerState) -> bool:
    return state.status is not ContainerStatus.STOPPED


def sandbox_id_of(state: ContainerState) -> str:
    """A container's sandbox id: its own id, or (a claimed warm slot) the one it was claimed as."""
    return state.labels.get(SANDBOX_ID_LABEL) or state.id


def outward(state: ContainerState) -> ContainerState:
    """The state as the agent's API shows it: by sandbox id, whatever the container's id."""
    sandbox_id = sandbox_id_of(state)
    return state if sandbox_id == state.id else replace(state, id=sandbox_id)
