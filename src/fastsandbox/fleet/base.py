"""The `AgentFleet` seam: how agents come and go (local processes, or Pods on Kubernetes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fastsandbox.api.models import SandboxPool


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
