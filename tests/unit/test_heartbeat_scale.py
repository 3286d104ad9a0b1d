"""The control loop at scale: 1000 agents (fake clients at the agent seam), one of them hung.
No answering agent is ever skipped for the hung one: while the hung agent's Status call is still
unanswered, every other agent answers heartbeat after heartbeat, and placement (synchronous, no
await) keeps working while heartbeats churn. How fresh heartbeats stay is a number, not a rule:
`benchmarks/heartbeat_staleness.py` prints it."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
from fastsandbox.control.pools import PoolManager
from fastsandbox.control.registry import AgentRecord, Registry
from fastsandbox.errors import Unavailable
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.store.memory import MemoryStore

INTERVAL = 0.5
AGENTS = 1000
HUNG = "a0007"
ROUNDS = 3  # answered heartbeats every other agent gets while the hung one's first is pending
LIVENESS_SECONDS = 120.0  # generous: the 2 shared cores may be busy; nothing here is timed


class FakeClients:
    """Status answers after a few ms; the hung agent's never answers until `release` is set."""

    def __init__(self) -> None:
        self.answered: Counter[str] = Counter()
        self.hung_asked = asyncio.Event()
        self.release = asyncio.Event()
        self.hung_pending = False

    def get(self, target: str) -> FakeClients.Client:
        return FakeClients.Client(self, target)

    class Client:
        def __init__(self, clients: FakeClients, target: str) -> None:
            self.clients, self.target = clients, target

        async def status(self, timeout: float = 5.0) -> agent_pb2.StatusResponse:
            clients = self.clients
            if self.target == HUNG:
                clients.hung_pending = True
                clients.hung_asked.set()
                await clients.release.wait()  # a wedged agent: no answer, then a time-out
                clients.hung_pending = False
                raise Unavailable("timed out")
            await asyncio.sleep(random.uniform(0.001, 0.02))
            clients.answered[self.target] += 1
            return agent_pb2.StatusResponse(capacity=5, images=["img"])


async def test_1000_agents_keep_answering_while_one_hangs(tmp_path: object) -> None:
    registry = Registry()
    clients = FakeClients()
    names = [f"a{i:04d}" for i in range(AGENTS)]
    for name in names:
        registry.upsert_agent(AgentRecord(name, "default", "p", name, "10.0.0.1", capacity=5))
    answering = [n for n in names if n != HUNG]
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
        async with asyncio.timeout(LIVENESS_SECONDS):
            await clients.hung_asked.wait()
            while not all(registry.agent(n).ready for n in answering):
                await asyncio.sleep(0.05)
            # Counted from a moment the hung call is pending, so every one of these answers
            # happened while it was.
            assert clients.hung_pending
            base = {n: clients.answered[n] for n in answering}
            allocated = 0
            while min(clients.answered[n] - base[n] for n in answering) < ROUNDS:
                registry.allocate(
                    namespace="default", pool="p", image="img", ports=[], sandbox_id=f"s{allocated}"
                )
                allocated += 1
                await asyncio.sleep(0.05)
        assert clients.hung_pending, "the hung agent answered: the test proved nothing"
        assert allocated > 0
        assert all(registry.agent(n).ready for n in answering)
        hung = registry.agent(HUNG)
        assert hung.last_heartbeat == 0 and hung.unready_since is None  # still waiting on it

        clients.release.set()  # its call times out now
        async with asyncio.timeout(LIVENESS_SECONDS):
            while hung.unready_since is None:
                await asyncio.sleep(0.01)
        assert not hung.ready
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await store.close()
