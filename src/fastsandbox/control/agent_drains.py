"""Draining and stopping a pool's agents (for `PoolManager`, whose plans say which).

Draining is the agent's to enforce, not only this registry's: every control-plane replica
places sandboxes, and only the leader's pool loop drains. So a drain cordons the agent (it
refuses new creates from any replica), and a draining agent is stopped only once a Status asked
after the cordon succeeded shows it cordoned with no slot (creates in flight included) and no
container. Every replica's heartbeat reads the agent's `cordoned` into its registry, so the
others stop placing there within a heartbeat; a plan that takes the agent back uncordons it, and
an agent restarted while draining (it starts uncordoned) is cordoned again on the next pass.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.registry import AgentRecord, Registry
from fastsandbox.errors import FsbError, NotFound
from fastsandbox.fleet.base import AgentFleet

log = logging.getLogger(__name__)


class AgentDrains:
    """Cordons, uncordons and stops agents of `registry` (through `agents`, and `fleet` to stop
    one). Calls to an agent last at most `call_timeout()` seconds; `on_event(kind, agent)`
    hears each step (undrained, stopped)."""

    def __init__(
        self,
        registry: Registry,
        agents: AgentClients,
        fleet: AgentFleet,
        *,
        call_timeout: Callable[[], float],
        on_event: Callable[[str, AgentRecord], None],
    ) -> None:
        self.registry = registry
        self.agents = agents
        self.fleet = fleet
        self._call_timeout = call_timeout
        self._event = on_event
        # Agents this replica's pool loop drains (leader only). A heartbeat that finds one of
        # them uncordoned (restarted) keeps it draining and has the next pass cordon it again.
        self.names: set[str] = set()

    def mark(self, agent: AgentRecord) -> None:
        agent.draining = True
        self.names.add(agent.name)

    async def cordon(self, agent: AgentRecord, cordon: bool = True) -> bool:
        """Ask the agent to refuse (or take again) new sandboxes. False when it cannot be
        asked; the next pass tries again."""
        try:
            reply = await self.agents.get(agent.target).cordon(cordon, timeout=self._call_timeout())
        except FsbError as exc:
            log.warning(
                "could not cordon agent" if cordon else "could not uncordon agent",
                extra={"agent": agent.name, "err": str(exc)},
            )
            return False
        # Stamped once answered: a Status asked before this may not show the change.
        agent.cordon_changed_at = time.monotonic()
        agent.cordoned = reply.cordoned
        return True

    async def undrain(self, agent: AgentRecord) -> None:
        """The pool needs the agent again: uncordon it first, then place on it."""
        if not await self.cordon(agent, False):
            return  # still draining; the plan asks again next pass if it still wants it
        self.names.discard(agent.name)
        agent.draining = False
        self._event("undrained", agent)
        log.info("agent takes sandboxes again", extra={"agent": agent.name, "pool": agent.pool})

    async def empty_on_agent(self, agent: AgentRecord) -> bool | None:
        """Cordon the agent, then ask its Status: True when it is cordoned and holds nothing
        (no slot, no create in flight, no container); False when it holds something or is not
        cordoned (restarted in between); None when it cannot be asked (not Ready, no answer)."""
        if not agent.ready:
            return None
        client = self.agents.get(agent.target)
        if not await self.cordon(agent):
            return None
        try:
            status = await client.status(timeout=self._call_timeout())
        except FsbError as exc:
            log.warning("agent unreachable", extra={"agent": agent.name, "err": str(exc)})
            return None
        agent.agent_slots = status.used_slots
        if not status.cordoned:
            return False
        if status.used_slots or status.creating or status.sandboxes:
            log.info(
                "draining agent is not empty yet; not stopping it",
                extra={
                    "agent": agent.name,
                    "slots": status.used_slots,
                    "creating": status.creating,
                    "containers": len(status.sandboxes),
                },
            )
            return False
        return True

    async def stop(self, agent: AgentRecord) -> None:
        # Placement skips it from here on: stopping takes a while (graceful exit, a Pod's
        # deletion), and not every caller drained it first (deleted pool, start timeout).
        self.mark(agent)
        log.info("stopping agent", extra={"agent": agent.name, "pool": agent.pool})
        with contextlib.suppress(NotFound):
            await self.fleet.stop_agent(agent.name)
        self.registry.remove_agent(agent.name)
        self.names.discard(agent.name)
        self._event("stopped", agent)
        await self.agents.drop(agent.target)
