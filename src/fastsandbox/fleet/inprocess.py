"""An `AgentFleet` whose agents run inside this process: the real agent gRPC server and
`SandboxManager` over a `FakeRuntime` each, on unix sockets. Unit tests of the control plane use
it to cross the real gRPC seam without containerd; kill() imitates a crashed agent."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from fastsandbox.agent.runtime.fake import FakeRuntime
from fastsandbox.agent.server import run as run_agent
from fastsandbox.api.models import SandboxPool
from fastsandbox.errors import NotFound
from fastsandbox.fleet.base import AgentHandle
from fastsandbox.settings import AgentSettings


@dataclass(slots=True)
class _Agent:
    handle: AgentHandle
    settings: AgentSettings
    runtime: FakeRuntime
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class InProcessFleet:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[str] = []
        self.stopped: list[str] = []
        self._agents: dict[str, _Agent] = {}

    def runtime(self, name: str) -> FakeRuntime:
        return self._agents[name].runtime

    async def start(self) -> list[AgentHandle]:
        for agent in self._agents.values():
            if agent.task is None or agent.task.done():
                await self._launch(agent)
        return [a.handle for a in self._agents.values()]

    async def start_agent(self, pool: SandboxPool, name: str) -> AgentHandle:
        state_dir = self.root / name
        sock = state_dir / "a.sock"
        settings = AgentSettings(
            name=name,
            pool=pool.metadata.name,
            namespace=pool.metadata.namespace,
            listen=f"unix://{sock}",
            state_dir=state_dir,
            containerd_socket=Path("/nonexistent"),
            capacity=pool.spec.max_sandboxes_per_agent,
            runtime=pool.spec.runtime.value,
            agent_ip=f"10.99.0.{len(self._agents) + 2}",
            version=pool.spec.agent_version,
        )
        handle = AgentHandle(
            name=name,
            pool=pool.metadata.name,
            namespace=pool.metadata.namespace,
            target=f"unix://{sock}",
            ip=settings.agent_ip,
            version=pool.spec.agent_version,
        )
        agent = _Agent(handle, settings, FakeRuntime())
        self._agents[name] = agent
        self.started.append(name)
        await self._launch(agent)
        return handle

    async def _launch(self, agent: _Agent) -> None:
        agent.stop = asyncio.Event()
        ready = asyncio.Event()
        agent.task = asyncio.create_task(
            run_agent(agent.settings, ready=ready, stop=agent.stop, runtime=agent.runtime)
        )
        await asyncio.wait_for(ready.wait(), 10)

    async def kill(self, name: str) -> None:
        """Stop the agent's server but keep its runtime (its containers 'keep running')."""
        agent = self._agents[name]
        agent.stop.set()
        if agent.task is not None:
            with contextlib.suppress(Exception):
                await agent.task

    async def stop_agent(self, name: str) -> None:
        if name not in self._agents:
            raise NotFound(f"agent {name} not found")
        await self.kill(name)
        del self._agents[name]
        self.stopped.append(name)

    async def agents(self) -> list[AgentHandle]:
        return [a.handle for a in self._agents.values()]

    async def close(self) -> None:
        for name in list(self._agents):
            await self.kill(name)
