"""Which containers are orphans, and which have been orphans long enough to remove.

A pure function over what one scan saw, so every rule is testable without a runtime or a clock:

- A container is an orphan when its agent is gone (`AGENT_GONE`) or, its agent alive, when no
  sandbox record points at it (`NO_RECORD`). Records know a claimed warm slot by its
  sandbox-id label (its container id is the slot's); an unclaimed warm slot has no record and
  belongs to its agent for as long as that lives.
- A create in flight (its slot taken, its record not yet written) is protected, but only for
  `in_flight_timeout` (much longer than any create): a slot that was never released must not
  shield a container for ever.
- It is removed only after it has been seen orphaned *continuously* for `orphan_timeout`: the
  first scan that sees it orphaned starts its clock; a scan that sees it recorded, in flight or
  owned by a live agent again forgets it. A Fast-mode create persists its record a few
  milliseconds after the container starts, so it can look orphaned for one scan; it never lives
  long enough without a record to be removed.
- Containers that are not ours are never touched, not even counted: several servers may share one
  containerd namespace (the system containerd), and another server's agents are "gone" for us.
  A container is ours when its agent is one we know (live now, or seen live earlier by this
  janitor) or when its log file lies under our agents' directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import PurePath

from fastsandbox.api.labels import AGENT_LABEL, SANDBOX_ID_LABEL, WARM_SLOT_LABEL


class Reason(StrEnum):
    AGENT_GONE = "agent-gone"
    """The container's agent is not one of the live agents."""
    NO_RECORD = "no-record"
    """Its agent lives, but no sandbox record points at the container and no create is in
    flight for it."""


@dataclass(frozen=True, slots=True)
class Seen:
    """One container as a scan saw it."""

    id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    log_path: str | None = None
    """Where the container's output goes (its task's stdout), when known."""

    @property
    def agent(self) -> str:
        return self.labels.get(AGENT_LABEL, "")

    @property
    def sandbox_id(self) -> str:
        """The id records know it by: its own, or the sandbox a warm slot was claimed as."""
        return self.labels.get(SANDBOX_ID_LABEL) or self.id

    @property
    def warm_slot(self) -> bool:
        return WARM_SLOT_LABEL in self.labels


@dataclass(frozen=True, slots=True)
class Known:
    """What the control plane knows at the time of the scan."""

    live_agents: frozenset[str]
    recorded: frozenset[str]
    """Container ids some sandbox record points at (`status.containerID`)."""
    in_flight: frozenset[str] = frozenset()
    """Container ids being created right now (their record is not written yet)."""
    our_agents: frozenset[str] = frozenset()
    """Agents known to be ours although not live now (e.g. seen live by an earlier scan)."""
    agents_dir: str | None = None
    """Our agents' directory: a container whose log is under it is ours whatever its agent."""


@dataclass(frozen=True, slots=True)
class Removal:
    id: str
    reason: Reason
    agent: str
    orphaned_for: float


@dataclass(frozen=True, slots=True)
class Decision:
    remove: tuple[Removal, ...]
    waiting: Mapping[str, Reason]
    """Orphans whose timeout has not passed yet."""
    orphaned_since: Mapping[str, float]
    """The clock state to hand to the next scan: when each current orphan was first seen."""
    foreign: tuple[str, ...] = ()
    """Containers that are not ours (left alone)."""


def is_ours(seen: Seen, known: Known) -> bool:
    if seen.agent and (seen.agent in known.live_agents or seen.agent in known.our_agents):
        return True
    if known.agents_dir and seen.log_path:
        return PurePath(seen.log_path).is_relative_to(known.agents_dir)
    return False


def orphan_reason(seen: Seen, known: Known) -> Reason | None:
    """Why the container is an orphan now, or None when a live sandbox record points at it."""
    if seen.agent not in known.live_agents:
        return Reason.AGENT_GONE
    if seen.warm_slot:
        return None  # no record ever points at a warm slot; its live agent owns it
    if seen.id in known.recorded or seen.sandbox_id in known.recorded:
        return None
    return Reason.NO_RECORD


def decide(
    seen: Iterable[Seen],
    known: Known,
    orphaned_since: Mapping[str, float],
    *,
    orphan_timeout: float,
    now: float,
    in_flight_timeout: float | None = None,
) -> Decision:
    """The containers to remove now and the orphan clocks to carry to the next scan.

    `orphaned_since` is the previous decision's; `now` is on the same (monotonic) clock.
    `in_flight_timeout` None: a create in flight is protected for as long as it lasts."""
    remove: list[Removal] = []
    waiting: dict[str, Reason] = {}
    since: dict[str, float] = {}
    foreign: list[str] = []
    for container in seen:
        if not is_ours(container, known):
            foreign.append(container.id)
            continue
        reason = orphan_reason(container, known)
        if reason is None:
            continue
        first = orphaned_since.get(container.id, now)
        since[container.id] = first
        if container.id in known.in_flight or container.sandbox_id in known.in_flight:
            # Never sooner than an orphan: the in-flight limit only ever extends the wait.
            if in_flight_timeout is None or now - first < max(in_flight_timeout, orphan_timeout):
                continue
        elif now - first < orphan_timeout:
            waiting[container.id] = reason
            continue
        remove.append(Removal(container.id, reason, container.agent, now - first))
    return Decision(tuple(remove), waiting, since, tuple(foreign))
