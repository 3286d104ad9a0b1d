"""The control plane's in-memory view of agents: slots, ports and cached images.

The registry is the admission point for the Fast-Path, so allocation is synchronous (no await
between choosing an agent and reserving its slot: two concurrent creates can never take the same
last slot or port) and never waits on heartbeat processing, which only swaps in new snapshots of
an agent's images and reported sandboxes. Agents are indexed by (namespace, pool), so a placement
only looks at its own pool's agents.

A slot is held by a sandbox id from `allocate` (or `adopt`, during recovery) until `release`,
which the caller makes only after the agent confirmed the container is gone.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from fastsandbox.api.images import normalize_image_ref
from fastsandbox.control import placement
from fastsandbox.control.placement_index import Key, PoolIndex
from fastsandbox.errors import CapacityExhausted, InvalidArgument, NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SandboxReport:
    """What an agent said about one of its containers in its last heartbeat."""

    exited: bool
    exit_code: int
    reason: str = ""


# Called with the agent and the sandbox ids whose state may have changed (exits, or every id
# of the agent when it becomes reachable or unreachable).
Listener = Callable[["AgentRecord", set[str]], None]

# What placement reads of an agent: setting any of these re-files it in its pool's index.
# `slots` is changed in place only by the registry's own methods, which re-file it themselves.
_PLACEMENT_FIELDS = frozenset(
    {"namespace", "pool", "capacity", "ready", "draining", "cordoned", "images", "slots"}
)


@dataclass(slots=True)
class AgentRecord:
    name: str
    namespace: str
    pool: str
    target: str
    ip: str
    capacity: int
    version: str = ""
    ready: bool = False
    # Takes no new sandboxes. On the replica that plans pools (the leader) the pool loop sets
    # and clears it; on every replica a heartbeat whose agent says it is cordoned sets it, and
    # one that says it is not clears it unless this replica's pool loop is draining the agent.
    draining: bool = False
    # What the agent said of itself in its last Status (or Cordon) answer.
    cordoned: bool = False
    # Slots the agent itself counts, its creates in flight included (last Status).
    agent_slots: int = 0
    # Warm slots ready on the agent, per image (last Status).
    warm_slots: dict[str, int] = field(default_factory=dict)
    # time.monotonic() of the last Cordon call this replica made: a Status asked before it is
    # stale about `cordoned`.
    cordon_changed_at: float = 0.0
    images: frozenset[str] = frozenset()
    last_heartbeat: float = 0.0
    # time.monotonic() when the agent stopped answering; None while it answers.
    unready_since: float | None = None
    reports: dict[str, SandboxReport] = field(default_factory=dict)
    # sandbox id -> ports it holds on this agent.
    slots: dict[str, frozenset[int]] = field(default_factory=dict)
    # Containers on this agent that were given up while it did not answer (their sandbox was
    # rescheduled elsewhere, or reset): should the agent come back, its next heartbeat stops
    # them before the agent counts as ready again (fencing: one copy of a sandbox at a time).
    superseded: set[str] = field(default_factory=set)
    # The registry holding this record (None before upsert_agent, and after it is replaced or
    # removed): told of every change placement reads.
    registry: Registry | None = field(default=None, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name in _PLACEMENT_FIELDS:
            registry = getattr(self, "registry", None)
            if registry is not None:
                registry._refile(self)

    @property
    def ports_in_use(self) -> frozenset[int]:
        used: set[int] = set()
        for ports in self.slots.values():
            used |= ports
        return frozenset(used)

    def candidate(self, *, ports: bool = True) -> placement.Candidate:
        """With `ports=False` (a request that asks for none) the ports in use are not
        gathered: no port can clash, and that union is most of a candidate's cost."""
        return placement.Candidate(
            name=self.name,
            namespace=self.namespace,
            pool=self.pool,
            capacity=self.capacity,
            allocated=len(self.slots),
            ports_in_use=self.ports_in_use if ports else frozenset(),
            images=self.images,
            ready=self.ready,
            # The agent's own word counts even before this replica's bookkeeping follows it.
            draining=self.draining or self.cordoned,
        )


@dataclass(frozen=True, slots=True)
class Allocation:
    agent: str
    target: str
    ip: str
    sandbox_id: str
    ports: frozenset[int]

    @property
    def endpoints(self) -> list[str]:
        return [f"{self.ip}:{port}" for port in sorted(self.ports)]


# Where an agent is in the placement index: its (namespace, pool), key and the images it is
# filed under.
_Filed = tuple[tuple[str, str], Key, frozenset[str]]


@functools.lru_cache(maxsize=1024)
def _normalized(image: str) -> str:
    """The image's normalised name for affinity (the name itself if it does not parse),
    remembered: a pool sees few distinct images and parsing one costs more than a placement."""
    try:
        return normalize_image_ref(image)
    except InvalidArgument:
        return image


def _any(name: str) -> bool:
    return True


class Registry:
    def __init__(self) -> None:
        self._agents: dict[str, AgentRecord] = {}
        self._by_pool: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._index: dict[tuple[str, str], PoolIndex] = defaultdict(PoolIndex)
        self._filed: dict[str, _Filed] = {}
        self.listeners: list[Listener] = []

    # -- placement index ----------------------------------------------------------------------
    def _refile(self, record: AgentRecord) -> None:
        """Bring the index in step with `record` (a no-op when nothing placement reads moved)."""
        if self._agents.get(record.name) is not record:
            return
        eligible = (
            record.ready
            and not record.draining
            and not record.cordoned
            and len(record.slots) < record.capacity
        )
        old = self._filed.get(record.name)
        if eligible:
            new = ((record.namespace, record.pool), (len(record.slots), record.name), record.images)
            if old == new:
                return
            if old is not None:
                self._index[old[0]].discard(old[1], old[2])
            self._index[new[0]].add(new[1], new[2])
            self._filed[record.name] = new
        elif old is not None:
            self._index[old[0]].discard(old[1], old[2])
            del self._filed[record.name]

    def _unfile(self, name: str) -> None:
        old = self._filed.pop(name, None)
        if old is not None:
            self._index[old[0]].discard(old[1], old[2])

    # -- agents -------------------------------------------------------------------------------
    def upsert_agent(self, record: AgentRecord) -> AgentRecord:
        existing = self._agents.get(record.name)
        if existing is not None:
            # Keep slots: they are the registry's own bookkeeping, not the agent's description.
            record.slots = existing.slots
            record.superseded = existing.superseded
            record.ready = existing.ready or record.ready
            record.reports = existing.reports
            record.unready_since = existing.unready_since
            record.images = existing.images or record.images
            record.draining = existing.draining or record.draining
            record.cordoned = existing.cordoned
            record.agent_slots = existing.agent_slots
            record.cordon_changed_at = existing.cordon_changed_at
            existing.registry = None
            # An agent re-registered in another pool leaves the old one's list (else removing
            # it later would leave a name there that no longer resolves).
            self._by_pool[(existing.namespace, existing.pool)].discard(record.name)
        self._agents[record.name] = record
        self._by_pool[(record.namespace, record.pool)].add(record.name)
        record.registry = self
        self._refile(record)
        return record

    def remove_agent(self, name: str) -> AgentRecord | None:
        record = self._agents.pop(name, None)
        if record is not None:
            self._by_pool[(record.namespace, record.pool)].discard(name)
            record.registry = None
            self._unfile(name)
        return record

    def agent(self, name: str) -> AgentRecord:
        try:
            return self._agents[name]
        except KeyError:
            raise NotFound(f"agent {name} is not registered") from None

    def get_agent(self, name: str) -> AgentRecord | None:
        return self._agents.get(name)

    def agents(self, namespace: str | None = None, pool: str | None = None) -> list[AgentRecord]:
        if namespace is not None and pool is not None:
            return [self._agents[n] for n in sorted(self._by_pool.get((namespace, pool), ()))]
        return [
            a
            for a in self._agents.values()
            if (namespace is None or a.namespace == namespace) and (pool is None or a.pool == pool)
        ]

    def heartbeat(
        self,
        name: str,
        *,
        images: Iterable[str],
        reports: dict[str, SandboxReport] | None = None,
    ) -> None:
        record = self._agents.get(name)
        if record is None:
            return
        images = frozenset(images)
        if images != record.images:
            record.images = images
        record.last_heartbeat = time.monotonic()
        changed: set[str] = set()
        if not record.ready:
            changed |= set(record.slots)
        if not record.ready:
            record.ready = True
        record.unready_since = None
        if reports is not None:
            changed |= {
                sid for sid, rep in reports.items() if record.reports.get(sid) != rep and rep.exited
            }
            record.reports = reports
        if changed:
            self._notify(record, changed)

    def mark_unready(self, name: str) -> None:
        record = self._agents.get(name)
        if record is None:
            return
        if record.unready_since is None:
            record.unready_since = time.monotonic()
        if record.ready:
            record.ready = False
            self._notify(record, set(record.slots))

    def _notify(self, record: AgentRecord, ids: set[str]) -> None:
        for listener in self.listeners:
            try:
                listener(record, ids)
            except Exception:
                log.exception("registry listener failed", extra={"agent": record.name})

    # -- slots --------------------------------------------------------------------------------
    def allocate(
        self,
        *,
        namespace: str,
        pool: str,
        image: str,
        ports: Iterable[int],
        sandbox_id: str,
        exclude: Collection[str] | None = None,
        exclusive_ports: bool = True,
    ) -> Allocation:
        """Reserve a slot on the best agent of the pool, skipping the agents in `exclude`
        (ones that just refused this request). `exclusive_ports`: the pool's sandboxes share
        their agent's network namespace, so a port is one sandbox's per agent."""
        wanted = frozenset(ports)
        chosen = self.place(
            namespace=namespace,
            pool=pool,
            image=image,
            ports=wanted,
            exclude=exclude,
            exclusive_ports=exclusive_ports,
        )
        if chosen is None:
            raise CapacityExhausted(self._why_no_fit(namespace, pool, wanted))
        record = self._agents[chosen]
        record.slots[sandbox_id] = wanted
        self._refile(record)
        log.debug("allocated", extra={"sandbox_id": sandbox_id, "agent": record.name})
        return Allocation(record.name, record.target, record.ip, sandbox_id, wanted)

    def place(
        self,
        *,
        namespace: str,
        pool: str,
        image: str,
        ports: frozenset[int],
        exclude: Collection[str] | None = None,
        exclusive_ports: bool = True,
    ) -> str | None:
        """The agent `allocate` picks, from the index, reserving nothing."""
        index = self._index.get((namespace, pool))
        if index is None:
            return None
        normalized = _normalized(image)
        agents = self._agents
        skip = frozenset(exclude) if exclude else frozenset()
        check_ports = bool(ports) and exclusive_ports
        if not skip and not check_ports:
            return index.best(image, normalized, _any)

        def usable(name: str) -> bool:
            if name in skip:
                return False
            return not (check_ports and agents[name].ports_in_use & ports)

        return index.best(image, normalized, usable)

    def place_linear(
        self,
        *,
        namespace: str,
        pool: str,
        image: str,
        ports: Iterable[int],
        exclude: Collection[str] | None = None,
        exclusive_ports: bool = True,
    ) -> str | None:
        """The agent `placement.choose` (the rule itself) picks scanning every agent of the
        pool, reserving nothing: the reference `place` is tested against."""
        wanted = frozenset(ports)
        request = placement.Request(
            namespace=namespace,
            pool=pool,
            image=image,
            ports=wanted,
            exclusive_ports=exclusive_ports,
        )
        names = self._by_pool.get((namespace, pool), set())
        if exclude:
            names = names - set(exclude)
        chosen = placement.choose(
            (self._agents[n].candidate(ports=bool(wanted)) for n in names), request
        )
        return None if chosen is None else chosen.name

    def adopt(self, agent: str, sandbox_id: str, ports: Iterable[int]) -> Allocation:
        """Record a slot that is already in use (recovery, declarative objects on restart)."""
        record = self.agent(agent)
        record.slots[sandbox_id] = frozenset(ports)
        self._refile(record)
        return Allocation(record.name, record.target, record.ip, sandbox_id, frozenset(ports))

    def release(self, agent: str, sandbox_id: str) -> None:
        record = self._agents.get(agent)
        if record is not None and record.slots.pop(sandbox_id, None) is not None:
            self._refile(record)
            log.debug("released", extra={"sandbox_id": sandbox_id, "agent": agent})

    def give_up(self, agent: str, sandbox_id: str) -> None:
        """Release the slot of a container on an unreachable agent without its confirmation,
        and remember to stop the container should that agent come back (`superseded`)."""
        self.release(agent, sandbox_id)
        record = self._agents.get(agent)
        if record is not None and sandbox_id:
            record.superseded.add(sandbox_id)

    def holder(self, sandbox_id: str) -> AgentRecord | None:
        for record in self._agents.values():
            if sandbox_id in record.slots:
                return record
        return None

    def pool_slots(self, namespace: str, pool: str) -> tuple[int, int]:
        """(total, allocated) over the pool's agents."""
        agents = self.agents(namespace, pool)
        return sum(a.capacity for a in agents), sum(len(a.slots) for a in agents)

    def _why_no_fit(self, namespace: str, pool: str, ports: frozenset[int]) -> str:
        agents = self.agents(namespace, pool)
        if not agents:
            return (
                f"pool {namespace}/{pool} has no agents yet; wait for it to become ready "
                "or raise its poolMin"
            )
        ready = [a for a in agents if a.ready and not a.draining]
        if not ready:
            if any(a.ready for a in agents):
                return (
                    f"every ready agent of pool {namespace}/{pool} is draining; retry once the "
                    "pool has started a new one"
                )
            return f"no agent of pool {namespace}/{pool} is ready yet; retry in a moment"
        free = [a for a in ready if len(a.slots) < a.capacity]
        if not free:
            total = sum(a.capacity for a in ready)
            return (
                f"pool {namespace}/{pool} is full ({total} of {total} slots in use); "
                "delete a sandbox or raise the pool's poolMax / maxSandboxesPerAgent"
            )
        return (
            f"every agent of pool {namespace}/{pool} with a free slot already uses port(s) "
            f"{', '.join(map(str, sorted(ports)))}; use other ports or add agents"
        )
