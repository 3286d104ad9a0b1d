"""The control loop at scale: 1000 agents (fake clients at the agent seam), one of them hung.
Every answering agent's heartbeat stays within two intervals, and placement (synchronous, no
await) keeps working while heartbeats churn."""

from __future__ import annotations

import asyncio
import random
import time

from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
from fastsandbox.control.pools import PoolManager
from fastsandbox.control.registry import AgentRecord, Registry
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.store.memory import MemoryStore

INTERVAL = 0.5
AGENTS = 1000


class FakeClient:
    def __init__(self, hung: bool) -> None:
        self.hung = hung

    async def status(self, timeout: float = 5.0) -> agent_pb2.StatusResponse:
        if self.hung:
            await asyncio.sleep(timeout)  # as a wedged agent: the call times out
            from fastsandbox.errors import Unavailable

            raise Unavailable("timed out")
        await asyncio.sleep(random.uniform(0.001, 0.02))
        return agent_pb2.StatusResponse(capacity=5, images=["img"])


class FakeClients:
    def __init__(self) -> None:
        self.clients: dict[str, FakeClient] = {}

    def get(self, target: str) -> FakeClient:
        return self.clients[target]


async def test_1000_agents_heartbeats_stay_fresh(tmp_path: object) -> None:
    registry = Registry()
    clients = FakeClients()
    for i in range(AGENTS):
        name = f"a{i:04d}"
        registry.upsert_agent(AgentRecord(name, "default", "p", name, "10.0.0.1", capacity=5))
        clients.clients[name] = FakeClient(hung=(i == 7))
    store = MemoryStore()
    pools = PoolManager(
        store,
        registry,
        InProcessFleet(tmp_path),  # type: ignore[arg-type]
        clients,  # type: ignore[arg-type]
        heartbeat_seconds=INTERVAL,
    )
    loop = asyncio.create_task(pools.heartbeat_loop())
    try:
        await asyncio.sleep(INTERVAL * 2)  # first round
        worst = 0.0
        allocated = 0
        end = time.monotonic() + INTERVAL * 6
        while time.monotonic() < end:
            now = time.monotonic()
            ages = [now - a.last_heartbeat for a in registry.agents() if a.name != "a0007"]
            worst = max(worst, *ages)
            registry.allocate(
                namespace="default", pool="p", image="img", ports=[], sandbox_id=f"s{allocated}"
            )
            allocated += 1
            await asyncio.sleep(0.05)
        assert worst <= 2 * INTERVAL, f"a heartbeat was {worst:.2f}s stale"
        assert not registry.agent("a0007").ready
        assert allocated > 0
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await store.close()
