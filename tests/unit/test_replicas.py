"""Several control-plane replicas over one store and one set of agents (the Kubernetes shape's
controller, here over MemoryStore + InProcessFleet): every replica serves creates, only the
leader converges and scales, and the agents' own capacity keeps them from over-admitting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastsandbox.api.models import (
    ObjectMeta,
    PoolCapacity,
    Sandbox,
    SandboxPhase,
    SandboxPool,
    SandboxPoolSpec,
    SandboxSpec,
)
from fastsandbox.control.create_request import CreateOptions
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.errors import CapacityExhausted
from fastsandbox.fleet.base import AgentHandle
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.store.memory import MemoryStore

IMG = "127.0.0.1:5000/busybox:latest"


class SharedFleet:
    """One replica's handle on the shared fleet: closing a replica leaves the agents running,
    as a controller Pod that exits leaves the agent Pods."""

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


SETTINGS = PlaneSettings(
    delete_grace_seconds=0,
    heartbeat_seconds=0.1,
    pool_resync_seconds=0.2,
    shared_agents=True,
    agent_sync_seconds=0.1,
    rebuild_records=False,
)


@dataclass
class Replicas:
    store: MemoryStore
    fleet: InProcessFleet
    leader: ControlPlane
    follower: ControlPlane


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0) -> None:
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


async def make_pool(store: MemoryStore, *, agents: int, per_agent: int) -> None:
    await store.create(
        SandboxPool(
            metadata=ObjectMeta(name="p"),
            spec=SandboxPoolSpec(
                capacity=PoolCapacity(pool_min=agents, pool_max=agents),
                max_sandboxes_per_agent=per_agent,
            ),
        )
    )


@pytest.fixture
async def replicas(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Replicas]:
    agents, per_agent = getattr(request, "param", (1, 3))
    store = MemoryStore(bookmark_interval=0.5)
    await make_pool(store, agents=agents, per_agent=per_agent)
    fleet = InProcessFleet(tmp_path)
    leader = ControlPlane(store, SharedFleet(fleet), SETTINGS)
    follower = ControlPlane(store, SharedFleet(fleet), SETTINGS)
    try:
        await leader.start_serving()
        await leader.start_leading()
        await follower.start_serving()
        yield Replicas(store, fleet, leader, follower)
    finally:
        await follower.close()
        await leader.close()
        await fleet.close()
        await store.close()


def sandbox(name: str) -> Sandbox:
    return Sandbox(
        metadata=ObjectMeta(name=name), spec=SandboxSpec(image=IMG, pool_ref="p", command=["x"])
    )


async def phase(store: MemoryStore, name: str) -> SandboxPhase:
    return (await store.get(Sandbox, "default", name)).status.phase


def ready_agents(plane: ControlPlane) -> int:
    return sum(1 for a in plane.registry.agents("default", "p") if a.ready)


async def test_follower_learns_agents_and_slots_the_leader_made(replicas: Replicas) -> None:
    leader, follower = replicas.leader, replicas.follower
    await eventually(lambda: ready_agents(follower) == 1)
    made = await leader.sandboxes.create(sandbox("a"), CreateOptions())
    await eventually(lambda: follower.registry.pool_slots("default", "p") == (3, 1))
    holder = follower.registry.holder(made.status.container_id)
    assert holder is not None and holder.name == made.status.assigned_agent

    await leader.sandboxes.delete("default", "a", wait=True)
    await eventually(lambda: follower.registry.pool_slots("default", "p") == (3, 0))


async def test_40_creates_over_two_replicas_admit_exactly_the_capacity(
    replicas: Replicas,
) -> None:
    leader, follower = replicas.leader, replicas.follower
    await eventually(lambda: ready_agents(follower) == 1)

    async def create(i: int) -> bool:
        plane = (leader, follower)[i % 2]
        try:
            await plane.sandboxes.create(sandbox(f"c{i}"), CreateOptions())
        except CapacityExhausted:
            return False
        return True

    results = await asyncio.gather(*(create(i) for i in range(40)))
    assert sum(results) == 3
    (agent,) = replicas.fleet._agents.values()
    assert len(await agent.runtime.list()) == 3

    # Fast mode answers before the record is stored; the store catches up right after.
    async def stored() -> int:
        return len(await replicas.store.list(Sandbox))

    await eventually(lambda: _eq(stored(), 3), timeout=30)
    assert await stored() == 3


async def _eq(count: Awaitable[int], want: int) -> bool:
    got = await count
    assert got <= want, f"{got} records for {want} admitted creates"
    return got == want


@pytest.mark.parametrize("replicas", [(2, 1)], indirect=True)
async def test_an_agent_refusing_for_capacity_sends_the_create_to_the_next(
    replicas: Replicas,
) -> None:
    leader, follower = replicas.leader, replicas.follower
    await eventually(lambda: ready_agents(follower) == 2)
    first = await leader.sandboxes.create(sandbox("first"), CreateOptions())
    # The follower's view has not caught up (as right after another replica's create).
    await eventually(lambda: follower.registry.holder(first.status.container_id) is not None)
    follower.registry.release(first.status.assigned_agent, first.status.container_id)
    other = {a.name for a in follower.registry.agents()} - {first.status.assigned_agent}

    second = await follower.sandboxes.create(sandbox("second"), CreateOptions())
    assert second.status.assigned_agent in other
    with pytest.raises(CapacityExhausted, match="is full"):
        await follower.sandboxes.create(sandbox("third"), CreateOptions())


async def test_only_the_leader_converges_declarative_records(replicas: Replicas) -> None:
    leader, follower, store = replicas.leader, replicas.follower, replicas.store
    await eventually(lambda: ready_agents(follower) == 1)
    await leader.stop_leading()
    await store.create(sandbox("decl"))
    await asyncio.sleep(0.5)
    assert await phase(store, "decl") is SandboxPhase.PENDING  # nobody leads

    await follower.start_leading()
    await eventually(lambda: _is_running(store, "decl"))
    assert follower.leading and not leader.leading


async def _is_running(store: MemoryStore, name: str) -> bool:
    return await phase(store, name) is SandboxPhase.RUNNING


async def test_a_new_leader_scales_pools_and_the_follower_forgets_stopped_agents(
    replicas: Replicas,
) -> None:
    leader, follower, store = replicas.leader, replicas.follower, replicas.store
    await eventually(lambda: ready_agents(follower) == 1)
    await leader.stop_leading()
    await follower.start_leading()
    pool = await store.get(SandboxPool, "default", "p")
    pool.spec.capacity = PoolCapacity(pool_min=2, pool_max=2)
    await store.update(pool)
    follower.pools.poke()
    await eventually(lambda: ready_agents(follower) == 2)
    await eventually(lambda: ready_agents(leader) == 2)  # learnt from the fleet

    pool = await store.get(SandboxPool, "default", "p")
    pool.spec.capacity = PoolCapacity(pool_min=1, pool_max=1)
    await store.update(pool)
    follower.pools.poke()
    await eventually(lambda: len(follower.registry.agents()) == 1)
    await eventually(lambda: len(leader.registry.agents()) == 1)


class StatusSubresourceStore(MemoryStore):
    """Like the apiserver with a status subresource: a create keeps no status, so the creator
    writes it in a second request (made slow here, so the Pending record is seen meanwhile)."""

    async def create(self, obj):  # type: ignore[no-untyped-def,override]
        blank = obj.model_copy(deep=True)
        blank.status = type(obj.status)()
        return await super().create(blank)

    async def update_status(self, obj):  # type: ignore[no-untyped-def,override]
        await asyncio.sleep(0.3)
        return await super().update_status(obj)


async def test_fast_creates_on_a_status_subresource_store_start_one_container_each(
    tmp_path: Path,
) -> None:
    # The record lands Pending (no status on create) before its creator writes Running: the
    # leader must leave it to the creator, not start a second container for it.
    store = StatusSubresourceStore(bookmark_interval=0.5)
    await make_pool(store, agents=1, per_agent=3)
    fleet = InProcessFleet(tmp_path)
    leader = ControlPlane(store, SharedFleet(fleet), SETTINGS)
    follower = ControlPlane(store, SharedFleet(fleet), SETTINGS)
    try:
        await leader.start_serving()
        await leader.start_leading()
        await follower.start_serving()
        await eventually(lambda: ready_agents(follower) == 1)
        for i, plane in enumerate((follower, leader, follower)):
            made = await plane.sandboxes.create(sandbox(f"f{i}"), CreateOptions())
            assert made.status.phase is SandboxPhase.RUNNING
        await asyncio.sleep(1.0)  # the leader's reconciler has looked at all three
        (agent,) = fleet._agents.values()
        assert len(await agent.runtime.list()) == 3
        assert len(agent.runtime.specs) == 3  # not even a short-lived second container
        for i in range(3):
            assert await phase(store, f"f{i}") is SandboxPhase.RUNNING
    finally:
        await follower.close()
        await leader.close()
        await fleet.close()
        await store.close()


async def test_demand_refused_on_a_follower_scales_the_pool_on_the_leader(
    tmp_path: Path,
) -> None:
    store = MemoryStore(bookmark_interval=0.5)
    await store.create(
        SandboxPool(
            metadata=ObjectMeta(name="p"),
            spec=SandboxPoolSpec(
                capacity=PoolCapacity(pool_min=1, pool_max=2), max_sandboxes_per_agent=1
            ),
        )
    )
    fleet = InProcessFleet(tmp_path)
    leader = ControlPlane(store, SharedFleet(fleet), SETTINGS)
    follower = ControlPlane(store, SharedFleet(fleet), SETTINGS)
    try:
        await leader.start_serving()
        await leader.start_leading()
        await follower.start_serving()
        await eventually(lambda: ready_agents(follower) == 1)
        await follower.sandboxes.create(sandbox("one"), CreateOptions())
        # The follower's create waits: its demand reaches the leader through the pool's
        # annotation, the leader starts an agent, the follower learns it from the fleet.
        two = await follower.sandboxes.create(sandbox("two"), CreateOptions())
        assert two.status.phase is SandboxPhase.RUNNING
        assert two.status.timings is not None and two.status.timings.scaled_ms is not None
        assert ready_agents(leader) == 2
        pool = await store.get(SandboxPool, "default", "p")
        assert "fastsandbox.io/demand" not in pool.metadata.annotations  # consumed
        with pytest.raises(CapacityExhausted, match=r"is full .*fsb pool scale p"):
            await follower.sandboxes.create(sandbox("three"), CreateOptions())
    finally:
        await follower.close()
        await leader.close()
        await fleet.close()
        await store.close()
