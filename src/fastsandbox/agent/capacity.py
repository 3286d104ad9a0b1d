"""One agent's slots: which sandboxes hold one, the ports they expose, and whether the agent is
draining. No runtime calls and no awaits: every check and the take it guards happen in one step.

Why it is shaped this way:
- Capacity is decided on the agent, not only in the control plane's registry: the agent is the
  one place that knows what really runs on it, so a stale or restarted control plane can never
  overfill it. Only sandboxes that have not exited count. The count is kept in memory (no
  runtime call when there is room) and re-read from the runtime (`recount`) only when the agent
  looks full, because sandboxes exit without telling us.
- Draining is decided here too (`cordon`): every control-plane replica places sandboxes, but only
  one plans which agents to stop, and the others learn of a drain a heartbeat later. A cordoned
  agent refuses new slots, checked in the same step that takes one, so a Status read after the
  cordon that shows no slot and no container means nothing more can start here. A restarted
  agent starts uncordoned; the control plane cordons it again.
- Ports: in a shared network a sandbox's exposed ports are the agent's own, so this agent is
  their one arbiter (control-plane replicas each see the others' placements late, and would
  otherwise hand one port to two sandboxes). Private networks publish each sandbox's ports on
  host ports of their own: no clash possible, nothing to check.
- Warm slots fill capacity no sandbox uses (`warm_count`); a create that finds no room retires
  one (`retire_warm`) rather than being refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from fastsandbox.agent.requests import is_live
from fastsandbox.agent.runtime.base import ContainerState
from fastsandbox.api import labels
from fastsandbox.errors import CapacityExhausted
from fastsandbox.settings import AgentSettings

log = logging.getLogger(__name__)


class Capacity:
    def __init__(self, settings: AgentSettings, *, shared_ports: bool) -> None:
        self.settings = settings
        self.shared_ports = shared_ports
        # Sandbox ids holding a slot: created (or being created) and not known to have exited.
        self.held: set[str] = set()
        # Ids whose create is in flight: they hold a slot the runtime cannot show yet.
        self.creating: set[str] = set()
        # The ports each sandbox holding a slot exposes (checked only in a shared network).
        self.ports: dict[str, frozenset[int]] = {}
        # Refusing new slots (the control plane is draining this agent).
        self.cordoned = False
        # Containers of this agent that are warm slots, and a way to give one up for a create.
        self.warm_count: Callable[[], int] = lambda: 0
        self.retire_warm: Callable[[], bool] = lambda: False

    def free(self) -> int:
        """Capacity neither a sandbox nor a warm slot holds."""
        return self.settings.capacity - len(self.held) - self.warm_count()

    def check_ports(self, sandbox_id: str, ports: tuple[int, ...]) -> None:
        """CapacityExhausted naming the port when another live sandbox of this agent exposes
        one of `ports` in the agent's shared network."""
        if not self.shared_ports or not ports:
            return
        for other in self.held:
            clash = sorted(self.ports.get(other, frozenset()).intersection(ports))
            if other != sandbox_id and clash:
                raise CapacityExhausted(
                    f"port {clash[0]} is already exposed on agent {self.settings.name} by "
                    f"sandbox {other} (sandboxes share the agent's network); schedule on "
                    "another agent or expose another port"
                )

    def take(self, sandbox_id: str, ports: tuple[int, ...]) -> None:
        """Check the ports and take the slot in one step (no await in between)."""
        self.check_ports(sandbox_id, ports)
        self.held.add(sandbox_id)
        self.ports[sandbox_id] = frozenset(ports)

    def take_if_room(self, sandbox_id: str, ports: tuple[int, ...]) -> bool:
        """Take a slot when the agent is not cordoned and has room (retiring a warm slot for
        it if need be). False: no slot taken."""
        if self.cordoned or (self.free() <= 0 and not self.retire_warm()):
            return False
        self.take(sandbox_id, ports)
        return True

    def check_not_cordoned(self) -> None:
        if self.cordoned:
            raise CapacityExhausted(
                f"agent {self.settings.name} is draining and takes no new sandboxes; "
                "schedule on another agent of the pool"
            )

    def full(self) -> CapacityExhausted:
        warm = self.warm_count()
        slots = f" and {warm} warm slot(s)" if warm else ""
        return CapacityExhausted(
            f"agent {self.settings.name} is full ({len(self.held)} sandbox(es){slots} of "
            f"{self.settings.capacity} slots); delete a sandbox or schedule on another agent"
        )

    def cordon(self, cordoned: bool) -> bool:
        """Refuse (True) or accept again (False) new sandboxes. Returns whether this changed
        anything; creates already past the check finish and keep their slots."""
        changed = self.cordoned != cordoned
        self.cordoned = cordoned
        if changed:
            log.info(
                "agent cordoned" if cordoned else "agent uncordoned",
                extra={"agent": self.settings.name, "sandboxes": len(self.held)},
            )
        return changed

    def recount(
        self, states: Mapping[str, ContainerState], before: set[str], creating: set[str]
    ) -> None:
        """The slots from a runtime listing (`states`, by sandbox id), keeping what changed
        while it was read: `before` is `held` when the listing began, `creating` the creates in
        flight then (one may finish before we look again: its slot stays, or Status would read
        empty)."""
        now = self.held
        added, removed = now - before, before - now
        live = {sid for sid, st in states.items() if is_live(st)}
        self.held = (live - removed) | added | (now & (self.creating | creating))
        # The ports of what runs, from its label (a restarted agent learns them here); those
        # of creates still in flight as they were taken.
        self.ports = {
            sid: ports_of(states[sid]) if sid in states else self.ports.get(sid, frozenset())
            for sid in self.held
        }


def ports_of(state: ContainerState) -> frozenset[int]:
    """The exposed ports a sandbox's container carries in its label (what the spec wrote)."""
    text = state.labels.get(labels.PORTS_LABEL, "")
    return frozenset(int(p) for p in text.split(",") if p.strip().isdigit())
