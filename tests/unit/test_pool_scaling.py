"""Pool sizing and rolling updates: the pure planner case by case (and by simulation), then
`PoolManager` over InProcessFleet with its fleet calls and agent steps recorded, then its demand
counting and stop races over a registry the test plays by hand, then `fsb apply`."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from fastsandbox.api.models import (
    Egress,
    NetworkMode,
    ObjectMeta,
    PoolCapacity,
    RollingUpdate,
    Runtime,
    Sandbox,
    SandboxPhase,
    SandboxPool,
    SandboxPoolSpec,
    SandboxSpec,
)
from fastsandbox.api.phases import set_condition
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.create_request import CreateOptions
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.control.pool_planner import AgentView, Plan, plan
from fastsandbox.control.pool_planner import no_room as plan_no_room
from fastsandbox.control.pools import PoolManager
from fastsandbox.control.registry import AgentRecord, Registry
from fastsandbox.errors import CapacityExhausted, Conflict, InvalidArgument
from fastsandbox.fleet.base import AgentHandle
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.store.memory import MemoryStore
from tests.unit.fastpath_fake import TOKEN, FakeFastPath, isolate_env, serve

IMG = "127.0.0.1:5000/busybox:latest"


def spec(
    pool_min: int = 1,
    pool_max: int = 3,
    per_agent: int = 1,
    buffer_min: int = 0,
    buffer_max: int = 0,
    version: str = "",
    surge: int = 1,
    unavailable: int = 0,
) -> SandboxPoolSpec:
    return SandboxPoolSpec(
        capacity=PoolCapacity(
            pool_min=pool_min, pool_max=pool_max, buffer_min=buffer_min, buffer_max=buffer_max
        ),
        max_sandboxes_per_agent=per_agent,
        agent_version=version,
        rolling_update=RollingUpdate(max_surge=surge, max_unavailable=unavailable),
    )


def agent(name: str, used: int = 0, *, cap: int = 1, version: str = "", **kw: bool) -> AgentView:
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


# ---------------------------------------------------------------- planner: sizing


def test_empty_pool_starts_pool_min() -> None:
    assert plan(spec(pool_min=2), []) == Plan(start=2)


def test_pool_min_counts_agents_already_starting() -> None:
    assert plan(spec(pool_min=2), [], starting=1) == Plan(start=1)
    assert plan(spec(pool_min=2), [], starting=2) == Plan()


def test_steady_pool_does_nothing() -> None:
    assert plan(spec(), [agent("a")]).empty
    assert plan(spec(), [agent("a", 1)]).empty


def test_pending_demand_starts_one_agent_per_missing_slot() -> None:
    assert plan(spec(), [agent("a", 1)], pending=1) == Plan(start=1)
    assert plan(spec(), [agent("a", 1)], pending=2) == Plan(start=2)


def test_pending_demand_is_capped_by_pool_max() -> None:
    assert plan(spec(pool_max=3), [agent("a", 1)], pending=10) == Plan(start=2)
    assert plan(spec(pool_max=1), [agent("a", 1)], pending=10).empty


def test_agents_starting_or_not_ready_count_as_coming_capacity() -> None:
    assert plan(spec(), [agent("a", 1)], pending=1, starting=1).empty
    assert plan(spec(), [agent("a", 1), agent("b", ready=False)], pending=1).empty


def test_demand_rounds_up_to_whole_agents() -> None:
    assert plan(spec(per_agent=4, pool_max=5), [agent("a", 4, cap=4)], pending=5).start == 2


def test_buffer_min_keeps_free_slots() -> None:
    assert plan(spec(buffer_min=2, per_agent=1), [agent("a", 1)]) == Plan(start=2)
    s = spec(buffer_min=2, per_agent=5, pool_max=10)
    assert plan(s, [agent("a", 4, cap=5)]) == Plan(start=1)
    assert plan(s, [agent("a", 3, cap=5)]).empty


def test_lost_agents_have_no_capacity_but_count_against_pool_max() -> None:
    s = spec(pool_max=2)
    assert plan(s, [agent("a", 0, ready=False, lost=True)], pending=1) == Plan(start=1)
    # Lost agents are never drained or stopped here: they may come back with their sandboxes.
    assert plan(s, [agent("a", ready=False, lost=True), agent("b")]).empty


def test_surplus_idle_agents_drain_and_stop_down_to_pool_min() -> None:
    got = plan(spec(), [agent("a", 1), agent("b"), agent("c")])
    assert got == Plan(drain=("b", "c"), stop=("b", "c"))


def test_never_drains_an_agent_holding_a_sandbox() -> None:
    assert plan(spec(pool_min=1), [agent("a", 1), agent("b", 1), agent("c", 1)]).empty
    # Exited containers kept for their logs count too.
    kept = replace(agent("b"), containers=1)
    assert plan(spec(), [agent("a", 1), kept]).empty


def test_draining_keeps_buffer_min_and_pending() -> None:
    s = spec(buffer_min=1, buffer_max=1)
    assert plan(s, [agent("a", 1), agent("b"), agent("c")]) == Plan(drain=("b",), stop=("b",))
    assert plan(spec(), [agent("a", 1), agent("b"), agent("c")], pending=1) == Plan(
        drain=("b",), stop=("b",)
    )


def test_buffer_max_allows_spare_agents() -> None:
    s = spec(buffer_min=0, buffer_max=2)
    assert plan(s, [agent("a", 1), agent("b"), agent("c")]).empty
    s = spec(buffer_min=0, buffer_max=1)
    assert plan(s, [agent("a", 1), agent("b"), agent("c")]) == Plan(drain=("b",), stop=("b",))


def test_pool_max_lowered_drains_idle_agents_only() -> None:
    s = spec(pool_min=1, pool_max=1, buffer_max=5)
    got = plan(s, [agent("a", 1), agent("b"), agent("c", 1)])
    assert got == Plan(drain=("b",), stop=("b",))


def test_draining_agent_is_stopped_only_when_idle() -> None:
    busy = agent("b", 1, draining=True)
    assert plan(spec(), [agent("a"), busy]).empty
    idle = agent("b", draining=True)
    assert plan(spec(), [agent("a"), idle]) == Plan(stop=("b",))


def test_draining_agents_do_not_count_as_capacity() -> None:
    got = plan(spec(), [agent("a", 1, draining=True)], pending=1)
    assert got == Plan(start=1)


def test_can_start_false_plans_no_start() -> None:
    assert plan(spec(pool_min=2), [], can_start=False) == Plan()


# ---------------------------------------------------------------- planner: rolling update


def test_rollout_surges_first_and_drains_old_only_once_the_new_one_is_ready() -> None:
    s = spec(version="v2")
    old = agent("old", 1, version="v1")
    assert plan(s, [old]) == Plan(start=1)
    assert plan(s, [old], starting=1).empty
    assert plan(s, [old, agent("new", version="v2", ready=False)]).empty
    # New agent Ready: the old one drains; it holds a sandbox, so it is not stopped.
    assert plan(s, [old, agent("new", version="v2")]) == Plan(drain=("old",))
    idle_old = agent("old", version="v1")
    assert plan(s, [idle_old, agent("new", version="v2")]) == Plan(drain=("old",), stop=("old",))


def test_rollout_with_max_unavailable_drains_before_replacing() -> None:
    s = spec(version="v2", surge=0, unavailable=1)
    old = agent("old", version="v1")
    assert plan(s, [old]) == Plan(drain=("old",), stop=("old",))
    assert plan(s, [agent("old", version="v1", draining=True)]) == Plan(start=1, stop=("old",))


def test_rollout_prefers_unready_and_idle_old_agents() -> None:
    s = spec(pool_min=3, pool_max=3, version="v2")
    agents = [
        agent("a", 1, version="v1"),
        agent("b", 0, version="v1"),
        agent("c", 0, version="v1", ready=False),
        agent("n", version="v2"),
    ]
    # c costs no availability; b and a must wait for more new agents to be Ready.
    assert plan(s, agents) == Plan(drain=("c",), stop=("c",))
    agents = [*agents[:2], agent("n", version="v2"), agent("m", version="v2")]
    assert plan(s, agents) == Plan(drain=("b",), stop=("b",))


def test_zero_surge_and_zero_unavailable_still_progresses() -> None:
    s = spec(version="v2", surge=0, unavailable=0)
    assert plan(s, [agent("old", version="v1")]) == Plan(start=1)


@dataclass
class SimAgent:
    name: str
    version: str
    used: int = 0
    ready: bool = False
    draining: bool = False

    def view(self, cap: int) -> AgentView:
        return AgentView(
            self.name, self.version, cap, self.used, self.used, self.ready, self.draining
        )


def simulate_rollout(
    n: int, surge: int, unavailable: int, busy: int, per_agent: int = 1
) -> list[list[SimAgent]]:
    """Apply plans until the pool is all-new; agents become Ready one pass after starting and
    busy old agents lose their sandbox a few passes after draining. Returns every state."""
    s = spec(
        pool_min=n,
        pool_max=n,
        per_agent=per_agent,
        version="v2",
        surge=surge,
        unavailable=unavailable,
    )
    names = itertools.count()
    agents = [SimAgent(f"old{i}", "v1", used=1 if i < busy else 0, ready=True) for i in range(n)]
    history = [[replace(a) for a in agents]]
    drained_at: dict[str, int] = {}
    for step in range(200):
        for a in agents:
            a.ready = True  # started last pass
            if a.draining and a.used and step - drained_at[a.name] >= 3:
                a.used = 0
        p = plan(s, [a.view(per_agent) for a in agents])
        for a in agents:
            if a.name in p.drain:
                a.draining = True
                drained_at[a.name] = step
        agents = [a for a in agents if a.name not in p.stop]
        history.append([replace(a) for a in agents])
        agents += [SimAgent(f"new{next(names)}", "v2") for _ in range(p.start)]
        history.append([replace(a) for a in agents])
        if all(a.version == "v2" and a.ready for a in agents) and len(agents) == n:
            return history
    raise AssertionError(f"rollout did not finish: {agents}")


@pytest.mark.parametrize(
    ("n", "surge", "unavailable", "busy"),
    [
        (n, s, u, b)
        for n in (1, 2, 3, 5)
        for s in (0, 1, 2)
        for u in (0, 1, 2)
        for b in (0, 1, n)
        if b <= n
    ],
)
def test_rollout_simulation_respects_surge_and_unavailable(
    n: int, surge: int, unavailable: int, busy: int
) -> None:
    history = simulate_rollout(n, surge, unavailable, busy)
    eff_surge = 1 if surge == 0 and unavailable == 0 else surge
    for state in history:
        active = [a for a in state if not a.draining]
        assert len(active) <= n + eff_surge, state
        available = sum(1 for a in active if a.ready)
        assert available >= n - unavailable, state
    final = history[-1]
    assert sorted(a.version for a in final) == ["v2"] * n


# ---------------------------------------------------------------- PoolManager over agents


class RecordingFleet(InProcessFleet):
    """Checks, at every stop, that the agent holds no slot and runs no container."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.plane: ControlPlane | None = None
        self.violations: list[str] = []

    async def stop_agent(self, name: str) -> None:
        if self.plane is not None:
            record = self.plane.registry.get_agent(name)
            if record is not None and record.slots:
                self.violations.append(f"{name} stopped holding {sorted(record.slots)}")
        if await self.runtime(name).list():
            self.violations.append(f"{name} stopped with containers")
        await super().stop_agent(name)


@dataclass
class Env:
    plane: ControlPlane
    store: MemoryStore
    fleet: RecordingFleet

    async def create(self, name: str, *, timeout: float = 10.0) -> Sandbox:
        """Create like a client that retries on RESOURCE_EXHAUSTED (noting the demand, as the
        Fast-Path does for a create that finds no free slot)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            sb = Sandbox(metadata=ObjectMeta(name=name), spec=SandboxSpec(image=IMG, pool_ref="p"))
            try:
                return await self.plane.sandboxes.create(sb, CreateOptions())
            except CapacityExhausted:
                self.plane.pools.note_demand("default", "p", name)
                assert asyncio.get_running_loop().time() < deadline, "no capacity in time"
                await asyncio.sleep(0.05)

    def agents(self) -> list[str]:
        return sorted(a.name for a in self.plane.registry.agents("default", "p"))

    async def pool(self) -> SandboxPool:
        return await self.store.get(SandboxPool, "default", "p")


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = MemoryStore(bookmark_interval=0.5)
    await store.create(SandboxPool(metadata=ObjectMeta(name="p"), spec=spec(1, 3, 1)))
    fleet = RecordingFleet(tmp_path)
    cp = ControlPlane(
        store,
        fleet,
        PlaneSettings(delete_grace_seconds=0, heartbeat_seconds=0.1, pool_resync_seconds=0.2),
    )
    fleet.plane = cp
    await cp.start()
    try:
        yield Env(cp, store, fleet)
    finally:
        await cp.close()
        await store.close()


async def test_demand_scales_up_and_idle_agents_drain_back(env: Env) -> None:
    assert len(env.agents()) == 1
    placed = [await env.create(f"s{i}") for i in range(3)]
    assert len({sb.status.assigned_agent for sb in placed}) == 3
    assert len(env.agents()) == 3
    assert len(env.fleet.started) == 3

    for sb in placed[:2]:
        await env.plane.sandboxes.delete("default", sb.metadata.name, wait=True)
    await eventually(lambda: len(env.agents()) == 1)
    assert env.agents() == [placed[2].status.assigned_agent]
    assert sorted(env.fleet.stopped) == sorted(sb.status.assigned_agent for sb in placed[:2])
    assert env.fleet.violations == []

    async def status_shows_one() -> bool:
        st = (await env.pool()).status
        return (st.agents.total, st.slots.total, st.slots.allocated) == (1, 1, 1)

    await eventually(status_shows_one)
    kept = await env.store.get(Sandbox, "default", "s2")
    assert kept.status.phase.value == "Running"
    # Still steady a few passes later.
    await asyncio.sleep(0.6)
    assert env.agents() == [placed[2].status.assigned_agent]


def new_sandbox(name: str) -> Sandbox:
    return Sandbox(metadata=ObjectMeta(name=name), spec=SandboxSpec(image=IMG, pool_ref="p"))


async def test_a_create_that_finds_the_pool_full_waits_for_its_new_agent(env: Env) -> None:
    first = await env.plane.sandboxes.create(new_sandbox("first"), CreateOptions())
    assert first.status.timings is not None and first.status.timings.scaled_ms is None
    # No retry here: the create itself waits while the pool starts its second agent.
    second = await env.plane.sandboxes.create(new_sandbox("second"), CreateOptions())
    assert second.status.phase is SandboxPhase.RUNNING
    assert second.status.timings is not None and second.status.timings.scaled_ms is not None
    assert second.status.assigned_agent != first.status.assigned_agent
    assert len(env.agents()) == 2 and len(env.fleet.started) == 2
    await env.plane.sandboxes.create(new_sandbox("third"), CreateOptions())
    # poolMax (3) reached, every slot taken: refused at once, naming the command that helps.
    with pytest.raises(CapacityExhausted, match=r"is full .*`fsb pool scale p --min 1 --max 4`"):
        await env.plane.sandboxes.create(new_sandbox("fourth"), CreateOptions())
    assert len(env.agents()) == 3


async def test_concurrent_creates_on_a_full_pool_start_one_agent_each(env: Env) -> None:
    await env.plane.sandboxes.create(new_sandbox("first"), CreateOptions())
    made = await asyncio.gather(
        *(env.plane.sandboxes.create(new_sandbox(n), CreateOptions()) for n in ("b", "c"))
    )
    assert len({sb.status.assigned_agent for sb in made}) == 2
    await asyncio.sleep(0.5)  # a few passes: nothing more is started for them
    assert len(env.agents()) == 3 and len(env.fleet.started) == 3


async def test_a_wait_that_runs_out_is_refused_and_the_pool_still_grows(env: Env) -> None:
    await env.create("first")
    env.plane.sandboxes.scale_wait_seconds = 0.0
    with pytest.raises(CapacityExhausted, match="starting an agent"):
        await env.plane.sandboxes.create(new_sandbox("second"), CreateOptions())
    # Its demand stays noted: the agent it asked for comes, and a retry finds room.
    await eventually(lambda: len(env.agents()) == 2)
    env.plane.pools.note_demand("default", "p", "second")  # the same request counts once
    await asyncio.sleep(0.5)
    assert len(env.agents()) == 2
    await env.create("second")


async def test_noted_demand_lapses_and_the_spare_agent_drains(env: Env) -> None:
    env.plane.pools.demand_seconds = 0.5
    await env.create("only")
    env.plane.pools.note_demand("default", "p", "gave-up")
    await eventually(lambda: len(env.agents()) == 2)
    await eventually(lambda: len(env.agents()) == 1)
    assert env.fleet.violations == []


async def test_version_change_rolls_every_agent_surge_ready_first(env: Env) -> None:
    placed = [await env.create(f"s{i}") for i in range(3)]
    old = set(env.agents())
    assert len(old) == 3
    pool = await env.pool()
    pool.spec.capacity = PoolCapacity(pool_min=3, pool_max=3)
    pool.spec.agent_version = "v2"
    pool.metadata.resource_version = ""  # replace whatever is stored (status writes move it)
    await env.plane.pools.update(pool)

    def draining(agent_name: str) -> bool:
        record = env.plane.registry.get_agent(agent_name)
        return record is not None and record.draining

    # The old agents hold sandboxes: each drains (once a new agent is Ready to take its place)
    # but stays until its sandbox is deleted.
    for sb in placed:
        await eventually(functools.partial(draining, sb.status.assigned_agent), timeout=15)
        await env.plane.sandboxes.delete("default", sb.metadata.name, wait=True)

    def rolled() -> bool:
        agents = env.plane.registry.agents("default", "p")
        return len(agents) == 3 and all(a.version == "v2" and a.ready for a in agents)

    await eventually(rolled, timeout=15)
    assert set(env.fleet.stopped) == old
    assert env.fleet.violations == []

    # Replay the agent steps: every drain of an old agent happened while at least 3 agents
    # that take sandboxes were Ready (maxUnavailable 0), so a surge agent was Ready first.
    events = [e for e in env.plane.pools.events if e.pool == "p"]
    ready: set[str] = set()
    first_drain = next(i for i, e in enumerate(events) if e.kind == "draining")
    first_new_ready = next(
        i for i, e in enumerate(events) if e.kind == "ready" and e.agent not in old
    )
    assert first_new_ready < first_drain
    for event in events:
        if event.kind == "ready":
            ready.add(event.agent)
        elif event.kind in {"draining", "stopped"}:
            ready.discard(event.agent)
            if event.kind == "draining":
                assert len(ready) >= 3, (event, ready)
    # At most maxSurge (1) extra agents ever took sandboxes at once.
    active: set[str] = set(old)
    for event in events:
        if event.kind == "started":
            active.add(event.agent)
        elif event.kind in {"draining", "stopped"}:
            active.discard(event.agent)
        assert len(active) <= 4, event

    async def status_rolled() -> bool:
        counts = (await env.pool()).status.agents
        return (counts.total, counts.ready, counts.updated, counts.draining) == (3, 3, 3, 0)

    await eventually(status_rolled)


async def test_update_pool_refuses_another_network(env: Env) -> None:
    """Agents keep the network they started with, so the pool's cannot change under them."""
    pool = await env.pool()
    pool.spec.network_mode = NetworkMode.SHARED
    with pytest.raises(InvalidArgument, match=r"spec\.networkMode: immutable"):
        await env.plane.pools.update(pool)
    pool = await env.pool()
    pool.spec.egress = Egress.ALLOW
    with pytest.raises(InvalidArgument, match=r"spec\.egress: immutable"):
        await env.plane.pools.update(pool)


async def test_update_pool_checks_runtime_and_resource_version(env: Env) -> None:
    pool = await env.pool()
    pool.spec.runtime = Runtime.GVISOR
    with pytest.raises(InvalidArgument, match="runtime is immutable"):
        await env.plane.pools.update(pool)
    stale = await env.pool()
    for _ in range(20):  # status writes also move the resourceVersion: read again and retry
        pool = await env.pool()
        pool.spec.capacity = PoolCapacity(pool_min=2, pool_max=3)
        try:
            await env.plane.pools.update(pool)
            break
        except Conflict:
            await asyncio.sleep(0.05)
    stale.spec.capacity = PoolCapacity(pool_min=3, pool_max=3)
    with pytest.raises(Conflict):
        await env.plane.pools.update(stale)
    await eventually(lambda: len(env.agents()) == 2)
    stored = await env.pool()
    assert stored.spec.capacity.pool_min == 2
    assert stored.metadata.generation == 2


# ---------------------------------------------------------------- fsb apply: documents


def test_apply_documents_are_validated_and_pools_come_first() -> None:
    from fastsandbox.cli.commands.apply import load_documents

    text = """\
kind: Sandbox
metadata: {name: s1}
spec: {image: busybox, poolRef: p1}
---
kind: SandboxPool
metadata: {name: p1, namespace: other}
spec: {capacity: {poolMin: 1, poolMax: 2}}
status: {agents: {total: 9}}
"""
    docs = load_documents(text, "team")
    assert [(d.kind, d.obj.metadata.namespace, d.obj.metadata.name) for d in docs] == [
        ("SandboxPool", "other", "p1"),
        ("Sandbox", "team", "s1"),
    ]
    pool = docs[0].obj
    assert isinstance(pool, SandboxPool)
    assert pool.status.agents.total == 0  # status is the server's: dropped


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Pod\nmetadata: {name: x}\n", "document 1: kind must be Sandbox or SandboxPool"),
        ("- a\n- b\n", "document 1: expected a mapping"),
        ("", "no documents"),
        ("kind: Sandbox\nmetadata: {name: x}\nspec: {poolRef: p}\n", "spec.image: required"),
        (
            "kind: SandboxPool\nmetadata: {name: p}\n---\n"
            "kind: SandboxPool\nmetadata: {name: q}\nspec: {capacity: {poolMin: 3, poolMax: 1}}\n",
            "document 2 (SandboxPool q)",
        ),
        ("kind: [", "not valid YAML"),
    ],
)
def test_apply_rejects_bad_documents_before_sending_anything(text: str, message: str) -> None:
    from fastsandbox.cli.commands.apply import load_documents

    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_documents(text, "default")


# ---------------------------------------------------------------- PoolManager: demand and races


class HandFleet(InProcessFleet):
    """Agents that never answer (the test plays their heartbeats on the registry), and a
    stop_agent that waits at a gate, so a test can act while an agent is being stopped."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = asyncio.Event()
        self.stopping = asyncio.Event()

    async def start_agent(self, pool: SandboxPool, name: str) -> AgentHandle:
        self.started.append(name)
        target = f"unix://{self.root}/{name}.sock"
        return AgentHandle(name, pool.metadata.name, pool.metadata.namespace, target, "10.0.0.9")

    async def stop_agent(self, name: str) -> None:
        self.stopping.set()
        await self.gate.wait()
        self.stopped.append(name)


@dataclass
class Bare:
    """A PoolManager over a registry the test fills by hand (no agent processes)."""

    pools: PoolManager
    store: MemoryStore
    registry: Registry
    fleet: HandFleet

    def add_agent(self, name: str, *, capacity: int = 1) -> AgentRecord:
        record = self.registry.upsert_agent(
            AgentRecord(name, "default", "p", f"unix:///nonexistent/{name}", "10.0.0.1", capacity)
        )
        self.registry.heartbeat(name, images=[], reports={})
        return record

    def take_slot(self, sandbox_id: str) -> None:
        self.registry.allocate(
            namespace="default", pool="p", image=IMG, ports=[], sandbox_id=sandbox_id
        )

    async def add_sandbox(
        self,
        name: str,
        phase: SandboxPhase,
        *,
        agent: str = "",
        container: str = "",
        unschedulable: bool = False,
    ) -> Sandbox:
        sb = Sandbox(metadata=ObjectMeta(name=name), spec=SandboxSpec(image=IMG, pool_ref="p"))
        sb.status.phase = phase
        sb.status.assigned_agent = agent
        sb.status.container_id = container
        if unschedulable:
            # What the lifecycle writes when a (re)start finds no free slot.
            set_condition(sb.status, "Scheduled", False, reason="Unschedulable", message="full")
        return await self.store.create(sb)

    async def plan(self) -> Plan:
        return await self.pools.reconcile(await self.store.get(SandboxPool, "default", "p"))


@pytest.fixture
async def bare(tmp_path: Path) -> AsyncIterator[Bare]:
    store = MemoryStore()
    await store.create(SandboxPool(metadata=ObjectMeta(name="p"), spec=spec(1, 3, 1)))
    registry = Registry()
    fleet = HandFleet(tmp_path)
    clients = AgentClients()
    pools = PoolManager(store, registry, fleet, clients, heartbeat_seconds=0.1)
    try:
        yield Bare(pools, store, registry, fleet)
    finally:
        fleet.gate.set()
        await pools.close()
        await clients.close()
        await fleet.close()
        await store.close()


async def test_a_create_in_flight_is_not_counted_as_demand_twice(bare: Bare) -> None:
    """A Strong-mode (or declarative) record is Pending, unassigned, while its container starts
    on the slot it already holds; a Fast create retried after RESOURCE_EXHAUSTED holds its slot
    before its record exists. Neither is missing capacity: no agent may start for it."""
    bare.add_agent("a")
    await bare.add_sandbox("strong", SandboxPhase.PENDING)
    bare.take_slot("strong-0001")
    assert (await bare.plan()).empty

    bare.registry.release("a", "strong-0001")
    await bare.store.delete(Sandbox, "default", "strong")
    bare.pools.note_demand("default", "p", "fast")
    bare.take_slot("fast-0001")
    assert (await bare.plan()).empty


async def test_a_sandbox_waiting_to_be_rescheduled_is_demand(bare: Bare) -> None:
    """AutoRecreate after agent loss (or a reset) that found no free slot keeps its old agent in
    its status and says so in its Scheduled condition: the pool must scale up for it."""
    bare.add_agent("a")
    await bare.add_sandbox("held", SandboxPhase.RUNNING, agent="a", container="h-1")
    bare.take_slot("h-1")
    await bare.add_sandbox(
        "moved", SandboxPhase.RUNNING, agent="gone", container="m-1", unschedulable=True
    )
    assert (await bare.plan()) == Plan(start=1)


async def test_an_expired_record_is_no_demand(bare: Bare) -> None:
    bare.add_agent("a")
    await bare.add_sandbox("held", SandboxPhase.RUNNING, agent="a", container="h-1")
    bare.take_slot("h-1")
    await bare.add_sandbox("old", SandboxPhase.EXPIRED, unschedulable=True)
    assert (await bare.plan()).empty


async def test_no_sandbox_lands_on_an_agent_while_it_is_being_stopped(bare: Bare) -> None:
    """The agent of a deleted pool is stopped; a create that got past the pool check before the
    delete must not be placed on it while the fleet is stopping it."""
    bare.add_agent("a")
    await bare.store.delete(SandboxPool, "default", "p")
    sweep = asyncio.create_task(bare.pools.reconcile_all(wait=False))
    await bare.fleet.stopping.wait()
    with pytest.raises(CapacityExhausted):
        bare.take_slot("late-0001")
    bare.fleet.gate.set()
    await sweep
    assert bare.registry.get_agent("a") is None


async def test_an_agent_holding_a_sandbox_is_not_stopped_when_its_start_times_out(
    bare: Bare,
) -> None:
    """A new agent answered its heartbeat task once, took a sandbox, then stopped answering
    before its start timeout: it is drained, not stopped under the sandbox."""
    bare.fleet.gate.set()
    bare.pools.start_timeout = 0.5
    assert await bare.plan() == Plan(start=1)
    await eventually(lambda: bool(bare.registry.agents("default", "p")))
    (agent,) = bare.registry.agents("default", "p")
    bare.registry.heartbeat(agent.name, images=[], reports={})
    bare.take_slot("s-0001")
    await eventually(lambda: agent.draining, timeout=30)
    await asyncio.sleep(0.2)
    assert bare.fleet.stopped == []
    assert bare.registry.get_agent(agent.name) is agent


# ---------------------------------------------------------------- fsb apply: against a Fast-Path


@pytest.fixture
def fastpath(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeFastPath]:
    isolate_env(monkeypatch, tmp_path)
    fake = FakeFastPath()
    fake.add_sandbox("s1", exposedPorts=[8080], labels={"app": "a"})
    with serve(fake) as address:
        monkeypatch.setenv("FSB_ENDPOINT", address)
        monkeypatch.setenv("FSB_TOKEN", TOKEN)
        yield fake


def apply_text(tmp_path: Path, text: str) -> Any:
    from typer.testing import CliRunner

    from fastsandbox.cli.main import app

    manifest = tmp_path / "m.yaml"
    manifest.write_text(text)
    return CliRunner().invoke(app, ["apply", "-f", str(manifest)])


@pytest.mark.parametrize("key", ["exposedPorts", "exposed_ports"])
def test_apply_refuses_a_changed_immutable_field_however_it_is_spelled(
    fastpath: FakeFastPath, tmp_path: Path, key: str
) -> None:
    """The models accept snake_case names too: a change spelled so must not read as
    'unchanged'."""
    result = apply_text(
        tmp_path,
        f"kind: Sandbox\nmetadata: {{name: s1}}\n"
        f"spec: {{image: busybox, poolRef: default-pool, {key}: [9090]}}\n",
    )
    assert result.exit_code == 2, result.output
    assert "spec.exposedPorts cannot change" in result.output
    assert "Update" not in fastpath.methods()


def test_apply_updates_only_the_mutable_fields_given(
    fastpath: FakeFastPath, tmp_path: Path
) -> None:
    result = apply_text(
        tmp_path,
        "kind: Sandbox\nmetadata: {name: s1, labels: {team: ml}}\n"
        "spec: {image: busybox, poolRef: default-pool, failurePolicy: AutoRecreate}\n",
    )
    assert result.exit_code == 0, result.output
    assert "sandbox default/s1 configured" in result.stdout
    req = fastpath.calls[-1].request
    assert fastpath.methods()[-1] == "Update"
    assert dict(req.labels) == {"team": "ml"}
    assert list(req.remove_labels) == ["app"]
    assert req.failure_policy == "AutoRecreate"
    assert not req.HasField("recovery_timeout_seconds")


# ---------------------------------------------------------------- no_room: wait or refuse


def _no_room(agents: list[AgentView], *, starting: bool = False, ns: str = "default") -> str | None:
    return plan_no_room(
        spec(1, 2, 2), agents, namespace=ns, pool="p", starting=starting, why="placement's"
    )


def test_no_room_waits_while_the_pool_may_still_grow() -> None:
    full = AgentView("a", "", 2, used=2, ready=True)
    assert _no_room([full]) is None  # below poolMax: the pool starts an agent
    assert _no_room([full, AgentView("b", "", 2)]) is None  # b is still starting
    assert _no_room([full, full], starting=True) is None
    taken_back = AgentView("c", "", 2, ready=True, draining=True)
    assert _no_room([full, replace(full, name="b"), taken_back]) is None


def test_no_room_refuses_at_pool_max_naming_the_command() -> None:
    full = [AgentView("a", "", 2, used=2, ready=True), AgentView("b", "", 2, used=2, ready=True)]
    message = _no_room(full)
    assert message is not None
    assert "is full (4 of 4 slots in use on 2 of poolMax 2 agents)" in message
    assert message.endswith("`fsb pool scale p --min 1 --max 3`")
    assert (_no_room(full, ns="team") or "").endswith("--max 3 -n team`")
    # A free slot that placement could not use (its ports): placement's reason stands.
    assert _no_room([full[0], AgentView("b", "", 2, used=1, ready=True)]) == "placement's"
    # A lost agent counts towards poolMax and brings no room.
    lost = AgentView("b", "", 2, lost=True)
    assert _no_room([full[0], lost]) is not None


async def test_a_create_before_the_pools_first_agent_is_ready_waits_for_it(env: Env) -> None:
    """What a create sent the moment `fsb server` says `ready` finds if the pool's first agent
    is not up yet: no agent at all. It waits for it instead of failing."""
    await env.plane.pools.create(SandboxPool(metadata=ObjectMeta(name="fresh"), spec=spec(1, 2, 1)))
    assert env.plane.registry.agents("default", "fresh") == []
    sb = Sandbox(metadata=ObjectMeta(name="early"), spec=SandboxSpec(image=IMG, pool_ref="fresh"))
    made = await env.plane.sandboxes.create(sb, CreateOptions())
    assert made.status.phase is SandboxPhase.RUNNING
    assert made.status.timings is not None and made.status.timings.scaled_ms is not None
    await env.plane.sandboxes.delete("default", "early", wait=True)
