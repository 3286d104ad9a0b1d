"""Pools: their records, their agents, and the agents' heartbeats.

`PoolManager` keeps at least `poolMin` agents per pool (started through the `AgentFleet`),
registers them, polls each agent's Status every heartbeat interval, all agents concurrently, so
one slow agent never delays another's heartbeat and placement never waits on any of it, and
writes the pool's status (agents, slots, cached images) when it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

from fastsandbox.api.models import AgentCounts, Sandbox, SandboxPool, SlotCounts
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.registry import AgentRecord, Registry, SandboxReport
from fastsandbox.errors import Conflict, FsbError, NotFound
from fastsandbox.fleet.base import AgentFleet, AgentHandle
from fastsandbox.store.base import ObjectStore

log = logging.getLogger(__name__)

AGENT_POOL_LABEL = "fastsandbox.io/pool"


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
    ) -> None:
        self.store = store
        self.registry = registry
        self.fleet = fleet
        self.agents = agents
        self.heartbeat_seconds = heartbeat_seconds
        self._wake = asyncio.Event()

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
        try:
            status = await self.agents.get(agent.target).status(
                timeout=max(self.heartbeat_seconds * 2, 2.0)
            )
        except FsbError as exc:
            if agent.ready:
                log.warning("agent unreachable", extra={"agent": agent.name, "err": str(exc)})
            self.registry.mark_unready(agent.name)
            return
        if not agent.ready:
            log.info("agent ready", extra={"agent": agent.name, "ip": agent.ip})
        agent.capacity = status.capacity or agent.capacity
        self.registry.heartbeat(
            agent.name,
            images=status.images,
            reports={
                st.sandbox_id: SandboxReport(st.exited, st.exit_code, st.reason)
                for st in status.sandboxes
            },
        )

    async def wait_ready(self, agent: AgentRecord, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.heartbeat(agent)
            if agent.ready:
                return True
            await asyncio.sleep(0.1)
        return False

    async def heartbeat_loop(self) -> None:
        """One beating task per agent, so a slow or hung agent (whose Status times out) never
        delays another agent's heartbeat; tasks follow agents as they are registered/removed."""
        beats: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                names = {a.name for a in self.registry.agents()}
                for name in names - beats.keys():
                    beats[name] = asyncio.create_task(self._beat(name), name=f"beat-{name}")
                for name in [n for n, t in beats.items() if n not in names or t.done()]:
                    beats.pop(name).cancel()
                await asyncio.sleep(min(self.heartbeat_seconds, 1.0))
        finally:
            for task in beats.values():
                task.cancel()
            await asyncio.gather(*beats.values(), return_exceptions=True)

    async def _beat(self, name: str) -> None:
        while (agent := self.registry.get_agent(name)) is not None:
            started = time.monotonic()
            await self.heartbeat(agent)
            await asyncio.sleep(max(self.heartbeat_seconds - (time.monotonic() - started), 0.0))

    # -- pools -------------------------------------------------------------------------------
    def poke(self) -> None:
        self._wake.set()

    async def reconcile_loop(self, interval: float = 2.0) -> None:
        while True:
            try:
                await self.reconcile_all()
            except FsbError:
                log.exception("pool reconcile failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    async def reconcile_all(self) -> None:
        pools = await self.store.list(SandboxPool)
        live = {(p.metadata.namespace, p.metadata.name) for p in pools}
        for agent in self.registry.agents():
            if (agent.namespace, agent.pool) not in live and not agent.slots:
                log.info("stopping agent of a deleted pool", extra={"agent": agent.name})
                await self.fleet.stop_agent(agent.name)
                self.registry.remove_agent(agent.name)
                await self.agents.drop(agent.target)
        await asyncio.gather(*(self.reconcile(pool) for pool in pools))

    async def reconcile(self, pool: SandboxPool) -> None:
        ns, name = pool.metadata.namespace, pool.metadata.name
        if pool.metadata.deletion_timestamp is not None:
            return
        agents = self.registry.agents(ns, name)
        missing = pool.spec.capacity.pool_min - len(agents)
        if missing > 0:
            started = await asyncio.gather(
                *(self._start_agent(pool) for _ in range(missing)), return_exceptions=True
            )
            for result in started:
                if isinstance(result, BaseException):
                    log.error("could not start agent", exc_info=result, extra={"pool": name})
        await self._write_status(pool)

    async def _start_agent(self, pool: SandboxPool) -> None:
        handle = await self.fleet.start_agent(pool, new_agent_name(pool.metadata.name))
        agent = self.register(handle, pool.spec.max_sandboxes_per_agent)
        log.info("agent started", extra={"agent": agent.name, "pool": pool.metadata.name})
        if not await self.wait_ready(agent, timeout=30.0):
            log.warning("agent not ready after 30s", extra={"agent": agent.name})
            return
        for image in pool.spec.prewarm_images:
            try:
                await self.agents.get(agent.target).pull(image)
            except FsbError:
                log.exception("prewarm pull failed", extra={"agent": agent.name, "image": image})

    async def _write_status(self, pool: SandboxPool) -> None:
        agents = self.registry.agents(pool.metadata.namespace, pool.metadata.name)
        total, allocated = self.registry.pool_slots(pool.metadata.namespace, pool.metadata.name)
        images: set[str] = set()
        for agent in agents:
            images |= agent.images
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
                "observed_generation": pool.metadata.generation,
            }
        )
        if status != pool.status:
            pool.status = status
            # Changed or gone meanwhile: the next pass writes a fresh view.
            with contextlib.suppress(Conflict, NotFound):
                await self.store.update_status(pool)

    # -- API ---------------------------------------------------------------------------------
    async def create(self, pool: SandboxPool) -> SandboxPool:
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
