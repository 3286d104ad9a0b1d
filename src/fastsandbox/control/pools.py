"""Pools: their records and their agents.

`PoolManager` sizes every pool by what `pool_planner.plan` says (agents to start, to drain, to
stop) from a snapshot of the pool's agents and its pending demand, and writes the pool's status
(agents, slots, cached images) when it changes. The agents' heartbeats are `heartbeats`'s; the
manager owns them (and shares its drains with them) so callers keep one entry point.

Draining (cordon, make sure the agent is empty, stop it) is `agent_drains`'s, on this manager's
plans.

Agents start in the background: a pool pass never waits for one, so a slow start in one pool
delays no other pool and a rolling update sees its surge agent become Ready on a later pass.
Demand reaches the loop through `note_demand` (a create that found no free slot), through
Pending, unplaced sandbox records and through records the lifecycle could not place again
(condition Scheduled=False, reason Unschedulable: a reschedule or a reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

from fastsandbox.api import labels
from fastsandbox.api.images import check_registry
from fastsandbox.api.models import (
    AgentCounts,
    Sandbox,
    SandboxPhase,
    SandboxPool,
    SandboxPoolSpec,
    SlotCounts,
    WarmSlotStatus,
)
from fastsandbox.api.phases import condition
from fastsandbox.control import pool_planner
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.agent_drains import AgentDrains
from fastsandbox.control.heartbeats import AgentHeartbeats
from fastsandbox.control.pool_planner import AgentView, Plan
from fastsandbox.control.registry import AgentRecord, Registry
from fastsandbox.errors import (
    CapacityExhausted,
    Conflict,
    FsbError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from fastsandbox.fleet.base import AgentFleet, AgentHandle
from fastsandbox.store.base import ObjectStore

log = logging.getLogger(__name__)

AGENT_POOL_LABEL = labels.POOL_LABEL
# How often a create waiting for room looks at its pool again between agents becoming Ready.
ROOM_TICK_SECONDS = 0.25
# The Scheduled condition's reason while a sandbox finds no free slot (set by the lifecycle).
UNSCHEDULABLE = "Unschedulable"


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """One step of a pool's agents: started, ready, draining, stopped (newest last)."""

    at: float
    kind: str
    namespace: str
    pool: str
    agent: str


def _wants_slot(sb: Sandbox) -> bool:
    """Not placed (yet, or again after its agent was lost or a reset) and still wanted."""
    if sb.metadata.deletion_timestamp is not None or sb.status.phase is SandboxPhase.EXPIRED:
        return False
    if sb.status.phase is SandboxPhase.PENDING and not sb.status.assigned_agent:
        return True
    scheduled = condition(sb.status, "Scheduled")
    return (
        scheduled is not None and scheduled.status == "False" and scheduled.reason == UNSCHEDULABLE
    )


def new_agent_name(pool: str) -> str:
    # Short: it names a network namespace and a unix socket path (108-byte limit).
    return f"{pool[:30]}-{secrets.token_hex(3)}"


class PoolManager:
    def __init__(
        self,
        store: ObjectStore,
        registry: Registry,
        fleet: AgentFleet,
        agents: AgentClients,
        *,
        heartbeat_seconds: float,
        demand_seconds: float = 60.0,
        start_timeout: float = 60.0,
    ) -> None:
        self.store = store
        self.registry = registry
        self.fleet = fleet
        self.agents = agents
        self.heartbeat_seconds = heartbeat_seconds
        # How long a noted demand holds a free slot for a create that has not come back.
        self.demand_seconds = demand_seconds
        # An agent not Ready this long after its start is stopped (and the start retried).
        self.start_timeout = start_timeout
        self._wake = asyncio.Event()
        self._pass_lock = asyncio.Lock()
        # (namespace, pool) -> request key -> time.monotonic() the demand lapses at.
        self._demand: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        self._starting: dict[tuple[str, str], set[asyncio.Task[None]]] = defaultdict(set)
        # Starts whose agent is not registered yet (a registered one counts as an agent).
        self._launching: dict[tuple[str, str], int] = defaultdict(int)
        # (namespace, pool) -> (no start before, last delay) after failed starts.
        self._backoff: dict[tuple[str, str], tuple[float, float]] = {}
        self.drains = AgentDrains(
            registry,
            agents,
            fleet,
            call_timeout=lambda: self.heartbeats.call_timeout,
            on_event=self._event,
        )
        # Recent agent steps of every pool, for diagnostics and tests.
        self.events: deque[PoolEvent] = deque(maxlen=1000)
        # With several control-plane replicas: hands demand noted here on to the leader, whose
        # pool loop is the one that scales (`replica_sync`).
        self.on_demand: Callable[[str, str, str], None] | None = None
        # The composition root's check of fields its fleet cannot honour (raises
        # InvalidArgument naming the field), run on every pool create and update.
        self.check_pool: Callable[[SandboxPool], None] | None = None
        # Registries prewarm images may come from (None: not checked here).
        self.allowed_registries: frozenset[str] | None = None
        # Set (and replaced) whenever an agent becomes Ready: creates waiting for room wake.
        self._room = asyncio.Event()
        # (namespace, pool) -> (time.monotonic() read, spec) for waiting creates.
        self._specs: dict[tuple[str, str], tuple[float, SandboxPoolSpec]] = {}
        self.heartbeats = AgentHeartbeats(
            registry,
            agents,
            heartbeat_seconds=heartbeat_seconds,
            drains=self.drains.names,
            poke=self.poke,
            on_ready=self._agent_ready,
        )

    def _event(self, kind: str, agent: AgentRecord) -> None:
        self.events.append(PoolEvent(time.time(), kind, agent.namespace, agent.pool, agent.name))

    # -- agents ------------------------------------------------------------------------------
    def register(self, handle: AgentHandle, capacity: int) -> AgentRecord:
        return self.registry.upsert_agent(
            AgentRecord(
                name=handle.name,
                namespace=handle.namespace,
                pool=handle.pool,
                target=handle.target,
                ip=handle.ip,
                capacity=capacity,
                version=handle.version,
            )
        )

    async def heartbeat(self, agent: AgentRecord) -> None:
        await self.heartbeats.heartbeat(agent)

    async def wait_ready(self, agent: AgentRecord, timeout: float) -> bool:
        return await self.heartbeats.wait_ready(agent, timeout)

    async def heartbeat_loop(self) -> None:
        await self.heartbeats.loop()

    def _agent_ready(self, agent: AgentRecord) -> None:
        self._event("ready", agent)
        # Wake the creates waiting for room (`wait_for_room`).
        self._room.set()
        self._room = asyncio.Event()

    # -- demand ------------------------------------------------------------------------------
    def note_demand(self, namespace: str, pool: str, key: str) -> None:
        """A create for `namespace/pool` found no free slot (`CapacityExhausted`).

        `key` names the request (the sandbox's name): notes with the same key count once. The
        demand holds one free slot for it until a sandbox of that name exists, or for
        `demand_seconds`; the pool loop wakes now and starts agents in the background, so the
        caller still fails at once and a retry succeeds once an agent is Ready.
        """
        self._demand[(namespace, pool)][key] = time.monotonic() + self.demand_seconds
        self.poke()
        if self.on_demand is not None:
            self.on_demand(namespace, pool, key)

    async def wait_for_room(
        self, namespace: str, pool: str, key: str, until: float, why: str
    ) -> None:
        """`SandboxService.wait_for_room`: a create (`key`) found no free slot in the pool.

        Notes its demand (once: the pool loop wakes now and starts an agent, or, on a follower,
        the leader's does), then returns when the pool may have room — an agent became Ready, or
        a short tick passed (a slot given back, another replica's agent) — so the caller tries
        again. Raises `CapacityExhausted` when the pool cannot grow (poolMax agents, none of
        them starting), naming the command that raises poolMax, or at `until` (monotonic).
        """
        spec = await self._spec(namespace, pool)
        noted = self._demand.get((namespace, pool), {}).get(key, 0.0)  # lapses at
        if noted <= time.monotonic():
            self.note_demand(namespace, pool, key)
        which = (namespace, pool)
        full = pool_planner.no_room(
            spec,
            [self._view(a) for a in self.registry.agents(namespace, pool)],
            namespace=namespace,
            pool=pool,
            starting=bool(self._launching.get(which) or self._starting.get(which)),
            why=why,
        )
        if full is not None:
            raise CapacityExhausted(full)
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise CapacityExhausted(
                f"{why} (pool {namespace}/{pool} is starting an agent, not ready in time; "
                "retry in a moment)"
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(remaining, ROOM_TICK_SECONDS)):
                await self._room.wait()

    async def _spec(self, namespace: str, pool: str) -> SandboxPoolSpec:
        """The pool's spec as of at most ROOM_TICK_SECONDS ago (one store read per tick per
        pool, however many creates wait)."""
        key = (namespace, pool)
        cached = self._specs.get(key)
        if cached is not None and time.monotonic() - cached[0] < ROOM_TICK_SECONDS:
            return cached[1]
        spec = (await self.store.get(SandboxPool, namespace, pool)).spec
        self._specs[key] = (time.monotonic(), spec)
        return spec

    def _pending(
        self, key: tuple[str, str], sandboxes: list[Sandbox], agents: list[AgentRecord]
    ) -> int:
        """Sandboxes of the pool that need a slot they do not hold: unplaced records, records
        waiting to be placed again (reschedule, reset) and noted demand, less the slots held
        by creates still in flight."""
        names = {s.metadata.name for s in sandboxes}
        waiting = {s.metadata.name for s in sandboxes if _wants_slot(s)}
        demand = self._demand.get(key)
        if demand:
            clock = time.monotonic()
            for name in [n for n, until in demand.items() if until <= clock or n in names]:
                del demand[name]
            waiting |= demand.keys()
            if not demand:
                del self._demand[key]
        # A create in flight already holds its slot while its record is still Pending (Strong
        # mode, declarative) or not written yet (a Fast retry after noted demand): counting it
        # again would start an agent nobody needs, drained again a pass later. Slots no record
        # names are those creates (or adopted orphans, until the janitor removes them).
        recorded = {s.status.container_id for s in sandboxes if s.status.container_id}
        in_flight = sum(1 for a in agents for sid in a.slots if sid not in recorded)
        return max(len(waiting) - in_flight, 0)

    # -- pools -------------------------------------------------------------------------------
    def poke(self) -> None:
        self._wake.set()

    async def reconcile_loop(self, interval: float = 2.0) -> None:
        try:
            while True:
                self._wake.clear()
                try:
                    await self.reconcile_all(wait=False)
                except FsbError:
                    log.exception("pool reconcile failed")
                # Not `wait_for`: on 3.11 it can swallow a cancel that lands as the event is
                # set (a poke during shutdown), and the loop would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
        finally:
            await self.close()

    async def reconcile_all(self, *, wait: bool = True) -> None:
        """One pass over every pool. With `wait`, returns only after the agents this pass
        started are Ready (or given up on), so a caller can place sandboxes right after."""
        async with self._pass_lock:
            pools = await self.store.list(SandboxPool)
            sandboxes = await self.store.list(Sandbox)
            live = {(p.metadata.namespace, p.metadata.name) for p in pools}
            for agent in self.registry.agents():
                if (agent.namespace, agent.pool) not in live and not agent.slots:
                    self.drains.mark(agent)
                    # Its pool is gone: an agent that cannot be asked is stopped all the same.
                    if await self.drains.empty_on_agent(agent) is False or agent.slots:
                        continue
                    log.info("stopping agent of a deleted pool", extra={"agent": agent.name})
                    await self.drains.stop(agent)
            self.drains.names &= {a.name for a in self.registry.agents()}
            by_pool: dict[tuple[str, str], list[Sandbox]] = defaultdict(list)
            for sb in sandboxes:
                by_pool[(sb.metadata.namespace, sb.spec.pool_ref)].append(sb)
            for key in [k for k in self._demand if k not in live]:
                del self._demand[key]
            await asyncio.gather(
                *(
                    self.reconcile(p, by_pool[(p.metadata.namespace, p.metadata.name)])
                    for p in pools
                )
            )
        if wait:
            starts = [t for tasks in self._starting.values() for t in tasks]
            await asyncio.gather(*starts, return_exceptions=True)

    async def reconcile(self, pool: SandboxPool, sandboxes: list[Sandbox] | None = None) -> Plan:
        ns, name = pool.metadata.namespace, pool.metadata.name
        if pool.metadata.deletion_timestamp is not None:
            return Plan()
        key = (ns, name)
        if sandboxes is None:
            sandboxes = [s for s in await self.store.list(Sandbox, ns) if s.spec.pool_ref == name]
        agents = self.registry.agents(ns, name)
        for record in agents:
            if record.cordoned and record.name not in self.drains.names:
                # Cordoned by an earlier leader: carry its drain on (the plan may undo it).
                self.drains.mark(record)
        plan = pool_planner.plan(
            pool.spec,
            [self._view(a) for a in agents],
            pending=self._pending(key, sandboxes, agents),
            starting=self._launching.get(key, 0),
            can_start=self._backoff.get(key, (0.0, 0.0))[0] <= time.monotonic(),
        )
        if not plan.empty:
            log.info(
                "pool plan",
                extra={
                    "pool": f"{ns}/{name}",
                    "start": plan.start,
                    "drain": list(plan.drain),
                    "stop": list(plan.stop),
                    "undrain": list(plan.undrain),
                },
            )
        for agent_name in plan.drain:
            agent = self.registry.get_agent(agent_name)
            if agent is not None and agent.name not in self.drains.names:
                # Synchronous with the snapshot: placement here skips it from now on; the
                # cordon below makes the agent refuse other replicas' creates too.
                self.drains.mark(agent)
                self._event("draining", agent)
                log.info("agent draining", extra={"agent": agent_name, "pool": name})
        for agent_name in plan.undrain:
            agent = self.registry.get_agent(agent_name)
            if agent is not None:
                await self.drains.undrain(agent)
        await asyncio.gather(
            *(
                self.drains.cordon(a)
                for a in self.registry.agents(ns, name)
                if a.name in self.drains.names and a.ready and not a.cordoned
            )
        )
        for agent_name in plan.stop:
            agent = self.registry.get_agent(agent_name)
            # Placement here skipped it since before any await, but other replicas may have
            # placed on it until its cordon: only the agent can say it is empty.
            if agent is None or not agent.draining or agent.slots:
                continue
            if await self.drains.empty_on_agent(agent) and agent.draining and not agent.slots:
                await self.drains.stop(agent)
        for _ in range(plan.start):
            task = asyncio.create_task(self._start_agent(pool), name=f"start-agent-{name}")
            self._starting[key].add(task)
            task.add_done_callback(functools.partial(self._started, key))
        await self._write_status(pool)
        return plan

    def _view(self, agent: AgentRecord) -> AgentView:
        return AgentView(
            name=agent.name,
            version=agent.version,
            capacity=agent.capacity,
            used=len(agent.slots),
            containers=len(agent.reports),
            ready=agent.ready,
            draining=agent.draining,
            lost=not agent.ready and agent.last_heartbeat > 0,
            agent_used=agent.agent_slots,
        )

    def _started(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._starting[key].discard(task)
        if not self._starting[key]:
            del self._starting[key]
        failed = task.cancelled() or task.exception() is not None
        if failed:
            if not task.cancelled():
                log.error("could not start agent", exc_info=task.exception(), extra={"pool": key})
            delay = min(max(self._backoff.get(key, (0.0, 0.5))[1] * 2, 1.0), 30.0)
            self._backoff[key] = (time.monotonic() + delay, delay)
        else:
            self._backoff.pop(key, None)
        self.poke()

    async def close(self) -> None:
        """Cancel the agent starts in flight (the agents already started stay). The drains
        are the next leader's now: from here on heartbeats follow the agents' cordons."""
        self.drains.names.clear()
        tasks = [t for tasks in self._starting.values() for t in tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _start_agent(self, pool: SandboxPool) -> None:
        key = (pool.metadata.namespace, pool.metadata.name)
        self._launching[key] += 1
        try:
            handle = await self.fleet.start_agent(pool, new_agent_name(pool.metadata.name))
            agent = self.register(handle, pool.spec.max_sandboxes_per_agent)
        finally:
            self._launching[key] -= 1
            if not self._launching[key]:
                del self._launching[key]
        log.info("agent started", extra={"agent": agent.name, "pool": pool.metadata.name})
        self._event("started", agent)
        if not await self.wait_ready(agent, timeout=self.start_timeout):
            if self.registry.get_agent(agent.name) is not agent:
                return  # drained and stopped meanwhile: not wanted any more
            log.warning(
                "agent not ready in time; stopping it",
                extra={"agent": agent.name, "seconds": self.start_timeout},
            )
            self.drains.mark(agent)
            # It may have answered its heartbeat task once and taken a sandbox meanwhile
            # (here, or through another replica): then it stays, draining, until the pool
            # finds it idle.
            idle = not agent.slots and await self.drains.empty_on_agent(agent) is not False
            if idle and not agent.slots:
                await self.drains.stop(agent)
            raise Unavailable(f"agent {agent.name} was not ready after {self.start_timeout}s")
        for image in pool.spec.prewarm_images:
            try:
                await self.agents.get(agent.target).pull(image)
            except FsbError:
                log.exception("prewarm pull failed", extra={"agent": agent.name, "image": image})

    async def _write_status(self, pool: SandboxPool) -> None:
        agents = self.registry.agents(pool.metadata.namespace, pool.metadata.name)
        total, allocated = self.registry.pool_slots(pool.metadata.namespace, pool.metadata.name)
        images: set[str] = set()
        warm: dict[str, int] = {}
        for agent in agents:
            images |= agent.images
            for image, ready in agent.warm_slots.items():
                warm[image] = warm.get(image, 0) + ready
        status = pool.status.model_copy(
            update={
                "agents": AgentCounts(
                    total=len(agents),
                    ready=sum(1 for a in agents if a.ready),
                    updated=sum(1 for a in agents if a.version == pool.spec.agent_version),
                    draining=sum(1 for a in agents if a.draining),
                ),
                "slots": SlotCounts(total=total, allocated=allocated),
                "cached_images": sorted(images),
                "warm_slots": [WarmSlotStatus(image=i, ready=n) for i, n in sorted(warm.items())],
                "observed_generation": pool.metadata.generation,
            }
        )
        if status != pool.status:
            pool.status = status
            # Changed or gone meanwhile: the next pass writes a fresh view.
            with contextlib.suppress(Conflict, NotFound):
                await self.store.update_status(pool)

    # -- API ---------------------------------------------------------------------------------
    def _check_images(self, pool: SandboxPool) -> None:
        if self.check_pool is not None:
            self.check_pool(pool)
        if self.allowed_registries is not None:
            for i, image in enumerate(pool.spec.prewarm_images):
                check_registry(image, self.allowed_registries, f"spec.prewarmImages[{i}]")

    async def create(self, pool: SandboxPool) -> SandboxPool:
        self._check_images(pool)
        stored = await self.store.create(pool)
        self.poke()
        return stored

    async def delete(self, namespace: str, name: str) -> None:
        await self.store.get(SandboxPool, namespace, name)
        users = [s for s in await self.store.list(Sandbox, namespace) if s.spec.pool_ref == name]
        if users:
            raise Conflict(
                f"pool {namespace}/{name} still has {len(users)} sandbox(es) "
                f"({', '.join(s.metadata.name for s in users[:5])}); delete them first"
            )
        await self.store.delete(SandboxPool, namespace, name)
        self.poke()

    async def update(self, pool: SandboxPool) -> SandboxPool:
        """Replace the pool's spec. A non-empty `metadata.resourceVersion` must match the stored
        one (`Conflict` otherwise); an empty one replaces whatever is stored."""
        ns, name = pool.metadata.namespace, pool.metadata.name
        self._check_images(pool)
        current = await self.store.get(SandboxPool, ns, name)
        if current.metadata.deletion_timestamp is not None:
            raise Conflict(f"pool {ns}/{name} is being deleted")
        if pool.spec.runtime != current.spec.runtime:
            raise InvalidArgument(
                f"spec.runtime: runtime is immutable (pool {ns}/{name} uses "
                f"{current.spec.runtime.value}); create a new pool for {pool.spec.runtime.value}"
            )
        for field, wire in (
            ("network_mode", "networkMode"),
            ("egress", "egress"),
            ("egress_allow", "egressAllow"),
        ):
            if getattr(pool.spec, field) != getattr(current.spec, field):
                # Agents keep the network they were started with: a change would leave the
                # pool's word and its agents' behaviour apart.
                raise InvalidArgument(
                    f"spec.{wire}: immutable (agents keep the network they started with); "
                    "create a new pool for another network"
                )
        current.spec = pool.spec
        if pool.metadata.resource_version:
            current.metadata.resource_version = pool.metadata.resource_version
        stored = await self.store.update(current)
        self.poke()
        return stored
