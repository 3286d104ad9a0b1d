"""The agent's command line, spelled once.

`AgentArgs` is what `fsb agent` parses (`cli/commands/agent.py` declares one option per field,
named after it) and what both fleets build (`argv()`: the local fleet's child processes, the
Kubernetes fleet's Pod args). The defaults here are the agent's defaults. A unit test parses
`argv()` back with the real `fsb agent` parser and expects the same `AgentArgs`, so the builder
and the parser cannot drift apart.

Imports nothing heavy: the verb's option defaults come from here before any agent code loads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from fastsandbox.api.models import DEFAULT_LOG_MAX_BYTES
from fastsandbox.settings import CONTAINERD_SOCKET, DELETE_GRACE_SECONDS

# Where the agent reads its bearer token when no --token-file is given; the Kubernetes fleet
# fills it from a Secret.
TOKEN_ENV = "FSB_AGENT_TOKEN"


@dataclass(frozen=True, slots=True)
class AgentArgs:
    """One field per `fsb agent` flag: `state_dir` is `--state-dir`, and so on."""

    name: str | None = None
    pool: str = "default-pool"
    namespace: str = "default"
    listen: str | None = None
    token_file: Path | None = None
    insecure_no_token: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    state_dir: Path | None = None
    containerd_socket: Path = CONTAINERD_SOCKET
    containerd_namespace: str = "fastsandbox"
    capacity: int = 5
    runtime: str = "runc"
    agent_ip: str = "127.0.0.1"
    netns_path: str | None = None
    network_mode: str = "shared"
    egress: str = "none"
    egress_allow: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    sandbox_subnet: str = "10.211.0.0/22"
    port_range: str = "20000-29999"
    cgroup_parent: str = "/fastsandbox"
    pod_uid: str | None = None
    insecure_registry: tuple[str, ...] = ()
    grace: float = DELETE_GRACE_SECONDS
    version: str | None = None
    init_path: str | None = None
    logger_path: str | None = None
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    metrics_listen: str | None = None
    warm_slots: int = 0
    warm_image: tuple[str, ...] = ()
    warm_recent: int = 1
    warm_cpu_millis: int | None = None
    warm_memory_bytes: int | None = None
    warm_pids_limit: int | None = None
    log_level: str = "info"
    log_format: str = "auto"
    log_file: Path | None = None

    def argv(self) -> list[str]:
        """`--flag=value` for every field that is set, defaults included: what a fleet asked
        for stays what it gets even if a later agent changes a default. A tuple is one flag per
        item, a true bool a bare `--flag`; None, False and () are left out. `=` keeps a value
        that starts with `-` from reading as a flag; Kubernetes expands `$(POD_IP)` in it."""
        out: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            flag = flag_of(f.name)
            if value is None or value is False:
                continue
            if value is True:
                out.append(flag)
            elif isinstance(value, tuple):
                out += [f"{flag}={item}" for item in value]
            else:
                out.append(f"{flag}={_text(value)}")
        return out


DEFAULTS = AgentArgs()


def flag_of(field_name: str) -> str:
    """The flag a field is spelled as on the command line (typer's own rule)."""
    return "--" + field_name.replace("_", "-")


def _text(value: object) -> str:
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)
