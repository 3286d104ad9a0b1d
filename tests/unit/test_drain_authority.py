"""The agent is the drain authority: a cordoned agent refuses new creates from every control-plane
replica, its Status counts creates in flight, the leader stops it only once a Status after the
cordon shows it empty, and every replica's heartbeat learns the cordon.

Agents here are the real gRPC server and `SandboxManager` in this process over a `FakeRuntime`
that can hold creates halfway (`GatedRuntime`), so a test can act while a create is in flight."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fastsandbox.agent.manager import SandboxManager
from fastsandbox.agent.requests import SandboxRequest
from fastsandbox.agent.runtime.base import ContainerSpec, ContainerState
from fastsandbox.agent.runtime.fake import FakeRuntime
from fastsandbox.agent.server import run as run_agent
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
from fastsandbox.api.models import (
    ObjectMeta,
    PoolCapacity,
    Sandbox,
    SandboxPool,
    SandboxPoolSpec,
    SandboxSpec,
)
from fastsandbox.control.agent_client import AgentClient, AgentClients
from fastsandbox.control.create_request import CreateOptions
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.control.pool_planner import AgentView, Plan, plan
from fastsandbox.control.pools import PoolManager
from fastsandbox.control.registry import AgentRecord, Registry
from fastsandbox.control.sandboxes import SandboxService
from fastsandbox.errors import CapacityExhausted
from fastsandbox.fleet.base import AgentHandle
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.settings import AgentSettings
from fastsandbox.store.memory import MemoryStore

IMG = "127.0.0.1:5000/busybox:latest"


class GatedRuntime(FakeRuntime):
    """Holds every create (after its slot was taken, before the container exists) while
    `hold_creates`, until `release` is set; `entered` says one is held."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_creates = False
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def create(self, spec: ContainerSpec) -> ContainerState:
        if self.hold_creates:
            self.entered.set()
            await self.release.wait()
        return await super().create(spec)


def spec(sandbox_id: str) -> agent_pb2.SandboxRuntimeSpec:
    return agent_pb2.SandboxRuntimeSpec(sandbox_id=sandbox_id, name=sandbox_id, image=IMG)


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = check()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@dataclass
class _Agent:
    settings: AgentSettings
    runtime: GatedRuntime
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class GatedFleet:
    """An `AgentFleet` of in-process agents over `GatedRuntime`s on unix sockets; `restart`
    runs a new agent process (a new `SandboxManager`) over the same runtime."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stopped: list[str] = []
        self._agents: dict[str, _Agent] = {}
        self._handles: dict[str, AgentHandle] = {}

    def runtime(self, name: str) -> GatedRuntime:
        return self._agents[name].runtime

    async def start(self) -> list[AgentHandle]:
        return list(self._handles.values())

    async def start_agent(self, pool: SandboxPool, name: str) -> AgentHandle:
        sock = self.root / f"{name}.sock"
        settings = AgentSettings(
            name=name,
            pool=pool.metadata.name,
            namespace=pool.metadata.namespace,
            listen=f"unix://{sock}",
            state_dir=self.root / name,
            containerd_socket=Path("/nonexistent"),
            capacity=pool.spec.max_sandboxes_per_agent,
            agent_ip="10.99.0.2",
            version=pool.spec.agent_version,
        )
        self._agents[name] = _Agent(settings, GatedRuntime())
        await self._launch(name)
        handle = AgentHandle(
            name, pool.metadata.name, pool.metadata.namespace, settings.listen, settings.agent_ip
        )
        self._handles[name] = handle
        return handle

    async def _launch(self, name: str) -> None:
        agent = self._agents[name]
        agent.stop = asyncio.Event()
        ready = asyncio.Event()
        agent.task = asyncio.create_task(
            run_agent(agent.settings, ready=ready, stop=agent.stop, runtime=agent.runtime)
        )
        await asyncio.wait_for(ready.wait(), 10)

    async def _kill(self, name: str) -> None:
        agent = self._agents[name]
        agent.stop.set()
        if agent.task is not None:
            with contextlib.suppress(Exception):
                await agent.task

    async def restart(self, name: str) -> None:
        await self._kill(name)
        await self._launch(name)

    async def stop_agent(self, name: str) -> None:
        await self._kill(name)
        del self._agents[name], self._handles[name]
        self.stopped.append(name)

    async def agents(self) -> list[AgentHandle]:
        return list(self._handles.values())

    async def close(self) -> None:
        for name in list(self._agents):
            await self._kill(name)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="fsb-drain-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pool_of(pool_min: int, pool_max: int, per_agent: int, version: str = "") -> SandboxPool:
    return SandboxPool(
        metadata=ObjectMeta(name="p"),
        spec=SandboxPoolSpec(
            capacity=PoolCapacity(pool_min=pool_min, pool_max=pool_max),
            max_sandboxes_per_agent=per_agent,
            agent_version=version,
        ),
    )


# ---------------------------------------------------------------- the agent


@dataclass
class One:
    fleet: GatedFleet
    client: AgentClient
    runtime: GatedRuntime


@pytest.fixture
async def one(sock_dir: Path) -> AsyncIterator[One]:
    fleet = GatedFleet(sock_dir)
    handle = await fleet.start_agent(pool_of(1, 1, 2), "agent-1")
    client = AgentClient(handle.target)
    try:
        yield One(fleet, client, fleet.runtime("agent-1"))
    finally:
        fleet.runtime("agent-1").release.set()
        await client.close()
        await fleet.close()


async def test_a_cordoned_agent_refuses_new_creates_until_uncordoned(one: One) -> None:
    await one.client.create(spec("before"))
    first = await one.client.cordon(True)
    again = await one.client.cordon(True)
    assert (first.cordoned, first.changed) == (True, True)
    assert (again.cordoned, again.changed) == (True, False)  # idempotent

    with pytest.raises(CapacityExhausted, match="agent agent-1 is draining"):
        await one.client.create(spec("refused"))
    # What it already holds is untouched: a retried create of it, and its delete, still work.
    assert (await one.client.create(spec("before"))).sandbox_id == "before"
    status = await one.client.status()
    assert status.cordoned
    assert (status.used_slots, [s.sandbox_id for s in status.sandboxes]) == (1, ["before"])
    assert "refused" not in one.runtime.specs
    assert await one.client.delete("before", 0)

    back = await one.client.cordon(False)
    assert (back.cordoned, back.changed) == (False, True)
    await one.client.create(spec("after"))
    status = await one.client.status()
    assert not status.cordoned and status.used_slots == 1


async def test_status_counts_a_create_in_flight_and_the_cordon_lets_it_finish(one: One) -> None:
    one.runtime.hold_creates = True
    create = asyncio.create_task(one.client.create(spec("flying")))
    await asyncio.wait_for(one.runtime.entered.wait(), 5)

    await one.client.cordon(True)
    status = await one.client.status()
    # No container yet, but not empty: the create passed the capacity check before the cordon.
    assert (status.cordoned, status.used_slots, status.creating) == (True, 1, 1)
    assert list(status.sandboxes) == []

    one.runtime.release.set()
    assert (await create).sandbox_id == "flying"
    status = await one.client.status()
    assert (status.used_slots, status.creating, len(status.sandboxes)) == (1, 0, 1)


async def test_a_restarted_agent_starts_uncordoned(one: One) -> None:
    await one.client.cordon(True)
    await one.fleet.restart("agent-1")
    assert not (await one.client.status()).cordoned


class ListGatedRuntime(GatedRuntime):
    """Also holds `list` after it has read the containers, until `list_release`."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_lists = False
        self.list_entered = asyncio.Event()
        self.list_release = asyncio.Event()

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerState]:
        listed = await super().list(labels)
        if self.hold_lists:
            self.list_entered.set()
            await self.list_release.wait()
        return listed


async def test_a_create_finishing_while_status_reads_the_runtime_still_counts(
    tmp_path: Path,
) -> None:
    """Status lists the runtime, a create in flight finishes before the list returns (its
    container is not in the list): Status must not read as empty."""
    runtime = ListGatedRuntime()
    settings = AgentSettings(
        name="a",
        pool="p",
        namespace="default",
        listen="unix:///unused",
        state_dir=tmp_path,
        containerd_socket=Path("/nonexistent"),
        capacity=2,
    )
    manager = SandboxManager(runtime, settings)
    await manager.start()
    runtime.hold_creates = True
    create = asyncio.create_task(manager.create(SandboxRequest(sandbox_id="s1", image=IMG)))
    await asyncio.wait_for(runtime.entered.wait(), 5)
    runtime.hold_lists = True
    status = asyncio.create_task(manager.status())
    await asyncio.wait_for(runtime.list_entered.wait(), 5)
    runtime.release.set()
    await create
    runtime.list_release.set()
    got = await status
    assert got.used_slots == 1


async def test_a_cordon_while_a_full_looking_agent_recounts_refuses_the_create(
    tmp_path: Path,
) -> None:
    """The capacity check re-reads the runtime when the agent looks full (an await): a cordon
    that lands meanwhile must still refuse the create that was waiting on the count."""
    runtime = ListGatedRuntime()
    settings = AgentSettings(
        name="a",
        pool="p",
        namespace="default",
        listen="unix:///unused",
        state_dir=tmp_path,
        containerd_socket=Path("/nonexistent"),
        capacity=1,
    )
    manager = SandboxManager(runtime, settings)
    await manager.start()
    await manager.create(SandboxRequest(sandbox_id="done", image=IMG))
    runtime.exit("done", 0)  # the slot is free, but the agent does not know it yet
    runtime.hold_lists = True
    create = asyncio.create_task(manager.create(SandboxRequest(sandbox_id="s2", image=IMG)))
    await asyncio.wait_for(runtime.list_entered.wait(), 5)
    manager.cordon(True)
    runtime.list_release.set()
    with pytest.raises(CapacityExhausted, match="is draining"):
        await create
    assert manager.used_slots == 0


# ---------------------------------------------------------------- the leader's pool loop


@dataclass
class Hand:
    """A pool loop and a sandbox service over real in-process agents whose heartbeats and pool
    passes the test drives one at a time."""

    store: MemoryStore
    registry: Registry
    fleet: GatedFleet
    clients: AgentClients
    pools: PoolManager
    sandboxes: SandboxService

    async def add_agent(self, name: str) -> AgentRecord:
        pool = await self.store.get(SandboxPool, "default", "p")
        record = self.pools.register(await self.fleet.start_agent(pool, name), 1)
        record.capacity = pool.spec.max_sandboxes_per_agent
        await self.pools.heartbeat(record)
        assert record.ready
        return record

    def client(self, name: str) -> AgentClient:
        return self.clients.get(self.registry.agent(name).target)

    async def beat(self) -> None:
        for record in self.registry.agents():
            await self.pools.heartbeat(record)

    async def plan(self) -> Plan:
        return await self.pools.reconcile(await self.store.get(SandboxPool, "default", "p"))

    async def set_pool(self, pool: SandboxPool) -> None:
        current = await self.store.get(SandboxPool, "default", "p")
        current.spec = pool.spec
        await self.store.update(current)


@pytest.fixture
async def hand(sock_dir: Path) -> AsyncIterator[Hand]:
    store = MemoryStore()
    await store.create(pool_of(1, 2, 1))
    registry = Registry()
    fleet = GatedFleet(sock_dir)
    clients = AgentClients()
    pools = PoolManager(store, registry, fleet, clients, heartbeat_seconds=0.1)
    sandboxes = SandboxService(
        store, registry, clients, grace_seconds=0, default_cpu="1", default_memory="64Mi"
    )
    try:
        yield Hand(store, registry, fleet, clients, pools, sandboxes)
    finally:
        for name in list(fleet._agents):
            fleet.runtime(name).release.set()
        await pools.close()
        await sandboxes.events.close()
        await clients.close()
        await fleet.close()
        await store.close()


async def drain_under_a_create_in_flight(hand: Hand) -> str:
    """Two idle agents, one too many: the pool drains a1 while another replica's create is in
    flight there (its record not written yet, so this registry holds no slot for it and the
    agent reports no container). Returns the name of the drained agent, which then holds it."""
    await hand.add_agent("a1")
    await hand.add_agent("a2")
    runtime = hand.fleet.runtime("a1")
    runtime.hold_creates = True
    elsewhere = asyncio.create_task(hand.client("a1").create(spec("other-replica")))
    await asyncio.wait_for(runtime.entered.wait(), 5)

    got = await hand.plan()
    assert (got.drain, got.stop) == (("a1",), ("a1",))
    assert hand.fleet.stopped == []
    assert hand.registry.agent("a1").draining
    assert (await hand.client("a1").status()).cordoned

    runtime.release.set()
    await elsewhere  # it got in before the cordon: it finishes
    await hand.beat()
    return "a1"


async def test_the_leader_never_stops_an_agent_whose_status_shows_a_create_in_flight(
    hand: Hand,
) -> None:
    drained = await drain_under_a_create_in_flight(hand)
    await hand.plan()
    assert hand.fleet.stopped == []  # its container is there now

    await hand.client(drained).delete("other-replica", 0)
    await hand.beat()
    await hand.plan()
    assert hand.fleet.stopped == [drained]


async def test_a_create_refused_for_draining_goes_to_the_next_agent(hand: Hand) -> None:
    """This replica has not heard of the cordon yet (no heartbeat since): the agent refuses and
    the create tries the next agent."""
    await hand.add_agent("a1")
    await hand.add_agent("a2")
    await hand.client("a1").cordon(True)
    assert not hand.registry.agent("a1").draining

    sb = Sandbox(metadata=ObjectMeta(name="s"), spec=SandboxSpec(image=IMG, pool_ref="p"))
    made = await hand.sandboxes.create(sb, CreateOptions())
    assert made.status.assigned_agent == "a2"
    assert hand.fleet.runtime("a1").specs == {}
    assert hand.registry.agent("a1").slots == {}


async def test_an_agent_restarted_while_draining_is_cordoned_again(hand: Hand) -> None:
    drained = await drain_under_a_create_in_flight(hand)
    await hand.fleet.restart(drained)
    assert not (await hand.client(drained).status()).cordoned
    await hand.beat()
    record = hand.registry.agent(drained)
    assert record.draining and not record.cordoned  # placement here keeps skipping it
    await hand.plan()
    assert (await hand.client(drained).status()).cordoned
    assert record.cordoned and hand.fleet.stopped == []


async def test_demand_coming_back_uncordons_a_draining_agent(hand: Hand) -> None:
    await hand.set_pool(pool_of(1, 2, 2))
    drained = await drain_under_a_create_in_flight(hand)
    for name in ("x", "y", "z"):  # a2 has 2 free slots; the third needs the drained agent's
        hand.pools.note_demand("default", "p", name)
    got = await hand.plan()
    assert (got.undrain, got.start) == ((drained,), 0)
    record = hand.registry.agent(drained)
    assert not record.draining and not record.cordoned
    assert not (await hand.client(drained).status()).cordoned
    await hand.beat()
    assert not record.draining


# ---------------------------------------------------------------- the planner


def view(name: str, used: int = 0, *, cap: int = 1, version: str = "", **kw: bool) -> AgentView:
    return AgentView(
        name=name,
        version=version,
        capacity=cap,
        used=used,
        containers=used,
        ready=kw.get("ready", True),
        draining=kw.get("draining", False),
        lost=kw.get("lost", False),
    )


def test_an_agent_counting_a_create_in_flight_is_not_idle() -> None:
    s = pool_of(1, 3, 1).spec
    # "a" would go first (by name); the agent says a create holds its slot: "b" goes instead.
    assert plan(s, [view("a"), view("b")]) == Plan(drain=("a",), stop=("a",))
    flying = AgentView("a", "", 1, used=0, containers=0, ready=True, agent_used=1)
    assert plan(s, [flying, view("b")]) == Plan(drain=("b",), stop=("b",))


def test_a_short_pool_takes_a_draining_agent_back_before_starting_one() -> None:
    s = pool_of(1, 3, 2).spec
    agents = [view("a", 2, cap=2), view("b", 1, cap=2, draining=True)]
    assert plan(s, agents, pending=1) == Plan(undrain=("b",))
    assert plan(s, agents, pending=2) == Plan(undrain=("b",), start=1)
    # Below poolMin.
    assert plan(pool_of(2, 3, 1).spec, [view("a"), view("b", draining=True)]) == Plan(
        undrain=("b",)
    )
    # Not when it brings no room, not an old version, not while unready.
    assert plan(s, [view("a", 2, cap=2), view("b", 2, cap=2, draining=True)], pending=1) == Plan(
        start=1
    )
    old = view("b", 1, cap=2, version="v0", draining=True)
    assert plan(s, [view("a", 2, cap=2), old], pending=1) == Plan(start=1)


def test_a_cancelled_roll_takes_the_old_agent_back() -> None:
    # Rolled to v2 (surge agent "new" Ready, "old" draining with a sandbox), then set to v1.
    s = pool_of(1, 1, 2, version="v1").spec
    agents = [view("new", cap=2, version="v2"), view("old", 1, cap=2, version="v1", draining=True)]
    assert plan(s, agents) == Plan(undrain=("old",), drain=("new",), stop=("new",))


# ---------------------------------------------------------------- replicas


class SharedFleet:
    """One replica's handle on the shared fleet: closing a replica leaves the agents running."""

    def __init__(self, fleet: InProcessFleet) -> None:
        self.fleet = fleet

    async def start(self) -> list[AgentHandle]:
        return await self.fleet.start()

    async def start_agent(self, pool: SandboxPool, name: str) -> AgentHandle:
        return await self.fleet.start_agent(pool, name)

    async def stop_agent(self, name: str) -> None:
        await self.fleet.stop_agent(name)

    async def agents(self) -> list[AgentHandle]:
        return await self.fleet.agents()

    async def close(self) -> None:
        pass


async def test_a_follower_stops_placing_on_a_cordoned_agent_after_one_heartbeat(
    tmp_path: Path,
) -> None:
    store = MemoryStore(bookmark_interval=0.5)
    await store.create(pool_of(2, 2, 1))
    fleet = InProcessFleet(tmp_path)
    settings = PlaneSettings(
        delete_grace_seconds=0,
        heartbeat_seconds=0.1,
        pool_resync_seconds=0.2,
        shared_agents=True,
        agent_sync_seconds=0.1,
        rebuild_records=False,
    )
    leader = ControlPlane(store, SharedFleet(fleet), settings)
    follower = ControlPlane(store, SharedFleet(fleet), settings)
    try:
        await leader.start_serving()
        await leader.start_leading()
        await follower.start_serving()
        await eventually(lambda: sum(a.ready for a in follower.registry.agents()) == 2)
        # The drain itself is the leader's; here the test plays it, with nobody planning.
        await leader.stop_leading()
        first, second = sorted(a.name for a in follower.registry.agents())
        cordoned = follower.registry.agent(first)  # the one placement would pick first
        await follower.clients.get(cordoned.target).cordon(True)
        await follower.pools.heartbeat(cordoned)
        assert cordoned.draining

        made = await follower.sandboxes.create(
            Sandbox(metadata=ObjectMeta(name="one"), spec=SandboxSpec(image=IMG, pool_ref="p")),
            CreateOptions(),
        )
        assert made.status.assigned_agent == second
        # Refused by this registry ("full": the draining agent is no candidate), not by the
        # draining agent after a try there.
        with pytest.raises(CapacityExhausted, match="is full"):
            await follower.sandboxes.create(
                Sandbox(metadata=ObjectMeta(name="two"), spec=SandboxSpec(image=IMG, pool_ref="p")),
                CreateOptions(),
            )
        assert await fleet.runtime(first).list() == []

        await follower.clients.get(cordoned.target).cordon(False)
        await follower.pools.heartbeat(cordoned)
        assert not cordoned.draining
        again = await follower.sandboxes.create(
            Sandbox(metadata=ObjectMeta(name="two"), spec=SandboxSpec(image=IMG, pool_ref="p")),
            CreateOptions(),
        )
        assert again.status.assigned_agent == first
    finally:
        await follower.close()
        await leader.close()
        await fleet.close()
        await store.close()
