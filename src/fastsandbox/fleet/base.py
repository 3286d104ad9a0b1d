"""The `AgentFleet` seam: how agents come and go (local processes, or Pods on Kubernetes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypedDict

from fastsandbox.api.models import SandboxLimits, SandboxPool
from fastsandbox.control.limits import pool_defaults


@dataclass(frozen=True, slots=True)
class AgentHandle:
    name: str
    pool: str
    namespace: str
    # gRPC target of the agent's API, e.g. "unix:///var/lib/fsb/agents/a1/agent.sock".
    target: str
    # Address sandboxes of this agent are reachable at (endpoints are ip:port).
    ip: str
    version: str = ""


@dataclass(frozen=True, slots=True)
class AgentAuth:
    """How the control plane proves itself to one agent, and checks it reached that agent.

    `token` is the bearer token the agent requires (its own: no two agents share one);
    `root_ca` (PEM), when set, makes the channel TLS: the agent's certificate must chain to it
    and name `server_name`. An agent on a unix socket needs neither.
    """

    token: str | None = None
    root_ca: bytes | None = None
    server_name: str | None = None


# The fleet's answer for a gRPC target, looked up each time a channel is made.
AgentAuthFor = Callable[[str], AgentAuth]


class AgentFleet(Protocol):
    async def start(self) -> list[AgentHandle]:
        """Open the fleet and return the agents that already exist (adopted after a restart)."""
        ...

    async def start_agent(self, pool: SandboxPool, name: str) -> AgentHandle:
        """Start one agent for `pool`; returns once its process exists (not necessarily Ready)."""
        ...

    async def stop_agent(self, name: str) -> None:
        """Stop and forget the agent. Its sandboxes must already be gone or moved."""
        ...

    async def agents(self) -> list[AgentHandle]: ...

    async def close(self) -> None:
        """Stop supervising. Agents are stopped too; their sandboxes keep running."""
        ...


class DefaultLimitArgs(TypedDict, total=False):
    """The `AgentArgs` fields of a pool's default limits (names as there)."""

    slot_cpu_millis: int
    slot_memory_bytes: int
    slot_pids: int
    default_disk_bytes: int
    log_max_bytes: int


def default_limit_args(pool: SandboxPool, fallback: SandboxLimits) -> DefaultLimitArgs:
    """`AgentArgs` fields (agent/args.py) for an agent of `pool`: the limits a create of the
    pool's defaults asks for (its `sandboxDefaults`, else `fallback`, the control plane's).
    The agent makes its warm slots with them, so the common claim changes no limit (no
    `runc update` on the request's path), and takes them as its own defaults for log and disk.
    A pool edited later still works: its agents' slots then differ, and a claim changes them."""
    limits = pool_defaults(pool.spec, fallback)
    return DefaultLimitArgs(
        slot_cpu_millis=limits.cpu_millis,
        slot_memory_bytes=limits.memory_bytes,
        slot_pids=limits.pids,
        default_disk_bytes=limits.disk_bytes,
        log_max_bytes=limits.log_max_bytes,
    )
