"""Keeping one replica's registry in step when other replicas use the same agents (Kubernetes).

Embedded there is one control plane: every slot it counts, it took itself. The Kubernetes
controller runs several replicas that all serve the Fast-Path, and only the leader starts and stops
agents, so each replica also learns what the others did:

- **agents** from the fleet (every `interval`, while following): agents the leader started are
  registered and heartbeaten here too, agents the fleet no longer lists are forgotten (the
  leader stopped them);
- **slots** from the store's Sandbox records (a watch): a record whose container holds a slot
  takes that slot here as well, and gives it back when the record says the container is gone
  (exited, expired, moved, deleted).

- **drains** from the agents themselves: the leader cordons an agent it drains, and every
  replica's heartbeat reads `cordoned` from the agent's Status (`PoolManager.heartbeat`), so
  placement here skips it within a heartbeat; until then the agent refuses the create.

- **demand** for the leader: a create refused for lack of room on a follower is noted in its
  pool's annotation `fastsandbox.io/demand` (`{sandbox name: unix deadline}`, batched); the
  leader hands each entry to its own pool loop (which is what scales) and clears the annotation.

This view lags behind the others' writes by a watch event, so it never decides admission alone:
the agent refuses a create beyond its capacity and the create tries the next candidate
(`SandboxService._place`), which is what keeps the replicas from over-admitting together.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable

from fastsandbox.api import labels
from fastsandbox.api.models import Sandbox, SandboxPool
from fastsandbox.api.phases import HOLDS_SLOT
from fastsandbox.control.pools import PoolManager
from fastsandbox.control.sandboxes import Key, SandboxService
from fastsandbox.control.watch_cache import WatchCache
from fastsandbox.errors import Conflict, FsbError, NotFound
from fastsandbox.store.base import EventType

log = logging.getLogger(__name__)

# On-demand fleet listings (a create found no room) are at least this far apart (seconds).
REFRESH_SPACING = 0.5

# Where followers leave demand for the leader: {sandbox name: unix time it lapses}.
DEMAND_ANNOTATION = labels.DEMAND_ANNOTATION
# How long a relayed demand holds (PoolManager.demand_seconds applies again on the leader).
DEMAND_SECONDS = 60.0
# Demand noted within this many seconds goes to the store in one write per pool.
DEMAND_BATCH_SECONDS = 0.2

# (agent name, container id, ports) a record's container holds.
Held = tuple[str, str, frozenset[int]]


def _held(sb: Sandbox) -> Held | None:
    status = sb.status
    if status.assigned_agent and status.container_id and status.phase in HOLDS_SLOT:
        return status.assigned_agent, status.container_id, frozenset(sb.spec.exposed_ports)
    return None


class ReplicaSync:
    def __init__(
        self,
        pools: PoolManager,
        sandboxes: SandboxService,
        *,
        leading: Callable[[], bool],
        interval: float = 2.0,
    ) -> None:
        self.pools = pools
        self.sandboxes = sandboxes
        self.registry = pools.registry
        self.leading = leading
        self.interval = interval
        # What each record's container holds, as last seen in the store.
        self._held: dict[Key, Held] = {}
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = -REFRESH_SPACING
        # Demand noted here, not yet written: (namespace, pool) -> name -> unix deadline.
        self._outbox: dict[tuple[str, str], dict[str, float]] = {}
        self._flushing: asyncio.Task[None] | None = None
        # Names and pools from the watches, read by creates before placement.
        self.cache = WatchCache()

    # -- agents ------------------------------------------------------------------------------
    async def agents_loop(self) -> None:
        while True:
            try:
                await self.sync_agents()
            except FsbError as exc:
                log.warning("agent sync failed", extra={"err": str(exc)})
            await asyncio.sleep(self.interval)

    async def sync_agents(self) -> None:
        """Register the fleet's agents this registry lacks, forget those it no longer lists.

        Not while leading: then this replica's pool passes start and stop every agent and
        register them themselves; one registered here while its start is still in flight would
        be counted twice (once as starting) and could be drained as surplus. `start_leading`
        syncs once before the first pass instead (agents a previous leader started)."""
        if self.leading():
            return
        known_before = {a.name for a in self.registry.agents()}
        handles = await self.pools.fleet.agents()
        capacity = {
            (p.metadata.namespace, p.metadata.name): p.spec.max_sandboxes_per_agent
            for p in await self.pools.store.list(SandboxPool)
        }
        listed = {h.name for h in handles}
        for handle in handles:
            # Checked and registered without an await in between: never replaces the record a
            # pool pass registered (and is waiting on) meanwhile.
            if self.registry.get_agent(handle.name) is None:
                self.pools.register(handle, capacity.get((handle.namespace, handle.pool), 1))
                log.info("agent discovered", extra={"agent": handle.name, "pool": handle.pool})
                self._adopt_for(handle.name)
        for name in known_before - listed:
            agent = self.registry.get_agent(name)
            if agent is not None:
                self.registry.remove_agent(name)
                await self.pools.agents.drop(agent.target)
                log.info("agent gone", extra={"agent": name})

    async def refresh(self, namespace: str, pool: str) -> bool:
        """Bring this replica's view of `namespace/pool`'s agents up to date now (a create found
        no room): list the fleet (at most once per `REFRESH_SPACING`, shared by concurrent
        callers) and ask the pool's new agents for their Status. True when the pool gained
        a ready agent, so the create is worth another try."""
        before = {a.name for a in self.registry.agents(namespace, pool) if a.ready}
        loop = asyncio.get_running_loop()
        if self._refreshing is None and loop.time() - self._refreshed_at >= REFRESH_SPACING:
            self._refreshed_at = loop.time()
            self._refreshing = asyncio.ensure_future(self.sync_agents())
            self._refreshing.add_done_callback(self._refresh_done)
        if self._refreshing is not None:
            with contextlib.suppress(FsbError):
                await asyncio.shield(self._refreshing)
        # Only agents never heard from (new ones): one that stopped answering would make every
        # refused create wait for its Status timeout.
        new = [
            a
            for a in self.registry.agents(namespace, pool)
            if not a.ready and a.last_heartbeat == 0
        ]
        await asyncio.gather(*(self.pools.heartbeat(a) for a in new))
        after = {a.name for a in self.registry.agents(namespace, pool) if a.ready}
        return bool(after - before)

    def _refresh_done(self, task: asyncio.Future[None]) -> None:
        self._refreshing = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("agent refresh failed", extra={"err": str(task.exception())})

    def _adopt_for(self, agent: str) -> None:
        for held in self._held.values():
            if held[0] == agent:
                self.registry.adopt(*held)

    # -- slots -------------------------------------------------------------------------------
    async def records_loop(self) -> None:
        store = self.sandboxes.store
        while True:
            try:
                since = await store.current_resource_version()
                records = await store.list(Sandbox)
                seen = {(s.metadata.namespace, s.metadata.name) for s in records}
                self.cache.names_listed(seen)
                for key in [k for k in self._held if k not in seen]:
                    self._release(key)
                for sb in records:
                    self.observe(sb)
                async for event in store.watch(Sandbox, since):
                    if event.type is EventType.BOOKMARK or not isinstance(event.object, Sandbox):
                        continue
                    meta = event.object.metadata
                    deleted = event.type is EventType.DELETED
                    self.cache.name_seen((meta.namespace, meta.name), deleted=deleted)
                    if deleted:
                        self._forget(event.object)
                    else:
                        self.observe(event.object)
            except Conflict:
                log.info("record watch history expired; listing again")
            except FsbError as exc:
                log.warning("record watch failed; listing again", extra={"err": str(exc)})
                self.cache.names_lost()
                await asyncio.sleep(self.interval)
            except BaseException:
                self.cache.names_lost()
                raise

    def observe(self, sb: Sandbox) -> None:
        key = (sb.metadata.namespace, sb.metadata.name)
        held = _held(sb)
        before = self._held.get(key)
        if before is not None and (held is None or held[:2] != before[:2]):
            self.registry.release(before[0], before[1])
        if held is None:
            self._held.pop(key, None)
        elif held != before:
            self._held[key] = held
            if self.registry.get_agent(held[0]) is not None:
                self.registry.adopt(*held)
        self.sandboxes.remember(sb)

    def _forget(self, sb: Sandbox) -> None:
        self._release((sb.metadata.namespace, sb.metadata.name))
        self.sandboxes._forget(sb)

    def _release(self, key: Key) -> None:
        before = self._held.pop(key, None)
        if before is not None:
            self.registry.release(before[0], before[1])

    # -- demand ------------------------------------------------------------------------------
    def note_demand(self, namespace: str, pool: str, key: str) -> None:
        """`PoolManager.on_demand`: a follower's refused create, for the leader to scale on."""
        if self.leading():
            return  # our own pool loop has it already
        self._outbox.setdefault((namespace, pool), {})[key] = time.time() + DEMAND_SECONDS
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(
                self._flush_demand(), name="demand-flush"
            )

    async def _flush_demand(self) -> None:
        await asyncio.sleep(DEMAND_BATCH_SECONDS)
        outbox, self._outbox = self._outbox, {}
        for (namespace, pool), wanted in outbox.items():
            try:
                await self._edit_demand(namespace, pool, functools.partial(_merged, wanted))
            except FsbError as exc:
                log.warning(
                    "could not pass demand to the leader",
                    extra={"pool": f"{namespace}/{pool}", "err": str(exc)},
                )

    async def _edit_demand(
        self,
        namespace: str,
        pool: str,
        change: Callable[[dict[str, float]], dict[str, float]],
    ) -> dict[str, float]:
        """Rewrite the pool's demand annotation (read, change, write with its resourceVersion,
        again on a conflict); returns the unexpired entries that were there."""
        store = self.pools.store
        for attempt in range(5):
            obj = await store.get(SandboxPool, namespace, pool)
            noted = _demand_of(obj)
            wanted = change(noted)
            text = json.dumps(wanted, sort_keys=True) if wanted else None
            if text == obj.metadata.annotations.get(DEMAND_ANNOTATION):
                return noted
            if text is None:
                del obj.metadata.annotations[DEMAND_ANNOTATION]
            else:
                obj.metadata.annotations[DEMAND_ANNOTATION] = text
            try:
                await store.update(obj)
            except Conflict:
                if attempt == 4:
                    raise
                continue
            return noted
        raise AssertionError("unreachable")

    async def demand_loop(self) -> None:
        """Leader only: hand the demand followers noted to our pool loop, then clear it."""
        while True:
            try:
                await self.relay_demand()
            except FsbError as exc:
                log.warning("demand relay failed", extra={"err": str(exc)})
            await asyncio.sleep(self.interval / 2)

    async def relay_demand(self) -> None:
        for pool in await self.pools.store.list(SandboxPool):
            if DEMAND_ANNOTATION not in pool.metadata.annotations:
                continue
            ns, name = pool.metadata.namespace, pool.metadata.name
            try:
                noted = await self._edit_demand(ns, name, _cleared)
            except NotFound:
                continue
            for key in noted:
                self.pools.note_demand(ns, name, key)
            if noted:
                log.info(
                    "demand from other replicas",
                    extra={"pool": f"{ns}/{name}", "requests": len(noted)},
                )


def _merged(wanted: dict[str, float], noted: dict[str, float]) -> dict[str, float]:
    return {**noted, **wanted}


def _cleared(_noted: dict[str, float]) -> dict[str, float]:
    return {}


def _demand_of(pool: SandboxPool) -> dict[str, float]:
    """The pool's unexpired demand entries (a malformed annotation counts as none)."""
    try:
        raw = json.loads(pool.metadata.annotations.get(DEMAND_ANNOTATION, "{}"))
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    clock = time.time()
    return {
        str(k): float(v) for k, v in raw.items() if isinstance(v, int | float) and float(v) > clock
    }
