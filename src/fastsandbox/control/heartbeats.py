"""Agents' heartbeats: every agent's Status asked each interval, all agents concurrently.

One beating task per agent, so one slow or hung agent (whose Status times out) never delays
another's heartbeat, and placement never waits on any of it: a heartbeat only swaps in the
agent's new snapshot (ready, capacity, slots it counts, images, its containers' exits) in the
registry.

Fencing: an agent that comes back after its sandboxes were rescheduled elsewhere (or deleted)
still runs their old containers. The first heartbeat that reaches it stops those (the
registry's `superseded`) before the agent counts as ready again, so the old copy never outlives
that heartbeat (it used to run on until the janitor's orphan timeout).

Every replica's heartbeat reads the agent's `cordoned` into its registry, so the others stop
placing on an agent the leader drains within a heartbeat. The drains themselves are the pool
loop's (`pools.PoolManager`); a heartbeat that finds one of its drained agents uncordoned
(restarted: an agent starts uncordoned) keeps it draining and wakes the pool loop to cordon it
again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.registry import AgentRecord, Registry, SandboxReport
from fastsandbox.errors import FsbError

log = logging.getLogger(__name__)


class AgentHeartbeats:
    def __init__(
        self,
        registry: Registry,
        agents: AgentClients,
        *,
        heartbeat_seconds: float,
        drains: set[str],
        poke: Callable[[], None],
        on_ready: Callable[[AgentRecord], None],
    ) -> None:
        self.registry = registry
        self.agents = agents
        self.heartbeat_seconds = heartbeat_seconds
        # The pool loop's drains (shared, not copied): agents this replica keeps draining.
        self._drains = drains
        # Wakes the pool loop (a drained agent lost its cordon).
        self._poke = poke
        self._on_ready = on_ready

    @property
    def call_timeout(self) -> float:
        return max(self.heartbeat_seconds * 2, 2.0)

    async def heartbeat(self, agent: AgentRecord) -> None:
        asked = time.monotonic()
        try:
            status = await self.agents.get(agent.target).status(timeout=self.call_timeout)
        except FsbError as exc:
            if agent.ready:
                log.warning("agent unreachable", extra={"agent": agent.name, "err": str(exc)})
            self.registry.mark_unready(agent.name)
            return
        if agent.superseded and not await self._fence(agent, status):
            # Copies given up while it was away still run there: not ready until they are gone.
            self.registry.mark_unready(agent.name)
            return
        became_ready = not agent.ready
        if became_ready:
            log.info("agent ready", extra={"agent": agent.name, "ip": agent.ip})
        agent.capacity = status.capacity or agent.capacity
        agent.agent_slots = status.used_slots
        agent.warm_slots = {w.image: w.ready for w in status.warm_slots}
        # A Status asked before our last Cordon call answered may predate it.
        if asked >= agent.cordon_changed_at:
            self._observe_cordon(agent, status.cordoned)
        self.registry.heartbeat(
            agent.name,
            images=status.images,
            reports={
                st.sandbox_id: SandboxReport(st.exited, st.exit_code, st.reason)
                for st in status.sandboxes
            },
        )
        if became_ready:
            self._on_ready(agent)

    async def _fence(self, agent: AgentRecord, status: agent_pb2.StatusResponse) -> bool:
        """Stop the containers given up while the agent did not answer (their sandbox runs
        elsewhere now, or was deleted), before this heartbeat counts: two copies of a sandbox
        never run side by side past the heartbeat that finds the agent back. True once none
        is left."""
        reported = {st.sandbox_id for st in status.sandboxes}
        client = self.agents.get(agent.target)
        for sandbox_id in sorted(agent.superseded):
            if sandbox_id in reported:
                try:
                    await client.delete(sandbox_id, grace_seconds=0)
                except FsbError as exc:
                    log.warning(
                        "could not stop a superseded container; retrying next heartbeat",
                        extra={"agent": agent.name, "sandbox_id": sandbox_id, "err": str(exc)},
                    )
                    return False
                log.warning(
                    "stopped a superseded container on an agent that came back",
                    extra={"agent": agent.name, "sandbox_id": sandbox_id},
                )
            agent.superseded.discard(sandbox_id)
        return True

    def _observe_cordon(self, agent: AgentRecord, cordoned: bool) -> None:
        was, agent.cordoned = agent.cordoned, cordoned
        if cordoned:
            if not agent.draining:
                # Drained by the leader (another replica, or this one in an earlier term).
                log.info("agent is draining", extra={"agent": agent.name, "pool": agent.pool})
            agent.draining = True
        elif agent.name in self._drains:
            # Not cordoned yet, or restarted since (an agent starts uncordoned): the next pass
            # cordons it; placement here skips it meanwhile.
            if was:
                log.info(
                    "draining agent lost its cordon; cordoning it again",
                    extra={"agent": agent.name},
                )
            self._poke()
        elif agent.draining:
            log.info("agent takes sandboxes again", extra={"agent": agent.name})
            agent.draining = False

    async def wait_ready(self, agent: AgentRecord, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.registry.get_agent(agent.name) is not agent:
                return False
            await self.heartbeat(agent)
            if agent.ready:
                return True
            await asyncio.sleep(0.1)
        return False

    async def loop(self) -> None:
        """One beating task per agent; tasks follow agents as they are registered/removed."""
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
