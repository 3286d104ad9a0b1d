"""What a pool should do next, as a pure function of its spec and a snapshot of its agents.

`plan()` does no I/O and keeps no state, so every rule is tested exhaustively on plain values;
`PoolManager` takes the snapshot, applies the plan, and asks again on the next pass. The rules:

- Size: keep `bufferMin ≤ free slots ≤ bufferMax` (plus one free slot per pending sandbox)
  within `poolMin..poolMax` agents. Agents still starting count with their whole capacity (they
  are coming), lost agents (were Ready, stopped answering) with none; both count as agents.
- Scale down only by draining *idle* agents (no slot, no container, none counted by the agent
  itself), and only while the free slots left still cover `bufferMin` + pending. A draining
  agent takes no new sandboxes (placement skips it; the agent refuses them too) and is stopped
  once idle; an agent holding a sandbox is never stopped.
- A drain is undone before anything is started: when the pool is short (below `poolMin`, or
  fewer free slots than it needs, or fewer current-version agents than a roll wants), Ready
  draining agents of the current version with a free slot take sandboxes again (`undrain`),
  the roomiest first, and only the rest of the shortage starts new agents. That covers demand
  coming back while an agent drains and a roll cancelled by setting the old version again.
- Rolling update: agents whose version differs from `agentVersion` are replaced. At most
  `desired + maxSurge` agents are active at once, and an old agent drains only while at least
  `desired - maxUnavailable` active agents stay Ready — with the default `maxUnavailable=0` the
  surge agent is Ready before any old one drains. An old agent that still holds sandboxes stays
  (draining) until they end; sandboxes are never moved.
- Room for a create that found none (`no_room`): the create waits while the pool may still get
  a free slot by itself (an agent starting, fewer than poolMax agents, a draining agent to take
  back), and is refused otherwise, with the command that raises poolMax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fastsandbox.api.models import SandboxPoolSpec


@dataclass(frozen=True, slots=True)
class AgentView:
    name: str
    version: str
    capacity: int
    # Slots held (sandboxes placed, not yet released).
    used: int = 0
    # Containers the agent reported in its last heartbeat (exited ones too, kept for logs).
    containers: int = 0
    ready: bool = False
    draining: bool = False
    # Was Ready once and stopped answering: no usable capacity until it returns.
    lost: bool = False
    # Slots the agent itself counted in its last Status, its creates in flight included (made
    # through other control-plane replicas, not in this one's `used` yet).
    agent_used: int = 0

    @property
    def idle(self) -> bool:
        return self.used == 0 and self.containers == 0 and self.agent_used == 0

    @property
    def free(self) -> int:
        return 0 if self.lost else max(self.capacity - max(self.used, self.agent_used), 0)


@dataclass(frozen=True, slots=True)
class Plan:
    start: int = 0
    drain: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    # Draining agents that take sandboxes again.
    undrain: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.start or self.drain or self.stop or self.undrain)


def buffer_bounds(spec: SandboxPoolSpec) -> tuple[int, int]:
    """(bufferMin, bufferMax) with an unset (0) or too small bufferMax read as bufferMin."""
    low = spec.capacity.buffer_min
    return low, max(spec.capacity.buffer_max, low)


def plan(
    spec: SandboxPoolSpec,
    agents: Sequence[AgentView],
    *,
    pending: int = 0,
    starting: int = 0,
    can_start: bool = True,
) -> Plan:
    """The next actions for one pool.

    `pending`: sandboxes of the pool that could not be placed for lack of capacity;
    `starting`: agents being started that are not registered yet; `can_start=False` (e.g. while
    backing off after failed starts) plans no starts but everything else.
    """
    cap = spec.max_sandboxes_per_agent
    version = spec.agent_version
    buffer_min, buffer_max = buffer_bounds(spec)
    pool_min, pool_max = spec.capacity.pool_min, spec.capacity.pool_max
    want_free = buffer_min + max(pending, 0)

    active = [a for a in agents if not a.draining]
    # Draining agents that could take sandboxes again at once, roomiest first.
    reclaimable = sorted(
        (
            a
            for a in agents
            if a.draining and a.version == version and a.ready and not a.lost and a.free > 0
        ),
        key=lambda a: (-a.free, a.name),
    )
    undrain: list[AgentView] = []
    rolling = any(a.version != version for a in active)
    if not rolling:
        # Short of agents or of free slots: each undrained agent brings its free slots. Stops
        # as soon as the need is covered, so none of them is surplus to drain again right away.
        count = len(active) + starting
        free = sum(a.free for a in active) + starting * cap
        for a in reclaimable:
            if count >= pool_max or (count >= pool_min and free >= want_free):
                break
            undrain.append(a)
            count += 1
            free += a.free
        active += [_undrained(a) for a in undrain]
    count = len(active) + starting
    free = sum(a.free for a in active) + starting * cap
    # Scale-up need counts what is free now (fragmented across agents as it is).
    up = count + math.ceil((want_free - free) / cap) if free < want_free else 0

    if rolling:
        surge = spec.rolling_update.max_surge
        unavailable = spec.rolling_update.max_unavailable
        if surge == 0 and unavailable == 0:
            surge = 1
        # The size the pool will have once rolled: its sandboxes packed on new agents plus
        # the free slots it needs (sandboxes on agents already draining stay where they are).
        used = sum(a.used for a in active)
        desired = max(math.ceil((used + want_free) / cap), up)
        desired = min(max(desired, pool_min), pool_max)
        # New-version agents still short of `desired` (within the surge): draining ones first.
        new_count = sum(1 for a in active if a.version == version) + starting
        room = min(desired - new_count, desired + surge - count)
        undrain = reclaimable[: max(room, 0)]
        active += [_undrained(a) for a in undrain]
        start, drain = _roll(active, starting, version, desired, surge, unavailable)
    else:
        desired = min(max(up or count, pool_min), pool_max)
        drain = _scale_down(active, count, free, want_free, buffer_max, pool_min, pool_max)
        start = max(desired - count, 0)
    if not can_start:
        start = 0

    kept = {a.name for a in undrain}
    stop = tuple(
        sorted(
            a.name
            for a in agents
            if (a.draining or a.name in drain) and a.name not in kept and a.idle and not a.lost
        )
    )
    return Plan(start=start, drain=tuple(sorted(drain)), stop=stop, undrain=tuple(sorted(kept)))


def _undrained(agent: AgentView) -> AgentView:
    return replace(agent, draining=False)


def _scale_down(
    active: list[AgentView],
    count: int,
    free: int,
    want_free: int,
    buffer_max: int,
    pool_min: int,
    pool_max: int,
) -> set[str]:
    """Idle agents to drain: surplus free slots above bufferMax (never below bufferMin +
    pending, nor below poolMin usable agents), and any agents above poolMax."""
    drain: set[str] = set()
    # Lost agents do not count towards poolMin here: never drain the last usable ones.
    usable = count - sum(1 for a in active if a.lost)
    idle = sorted((a for a in active if a.idle and not a.lost), key=lambda a: (a.ready, a.name))
    for agent in idle:
        if usable <= pool_min or free <= buffer_max:
            break
        if free - agent.free >= want_free:
            drain.add(agent.name)
            free -= agent.free
            usable -= 1
            count -= 1
    # Above poolMax (it was lowered): idle agents go; busy ones stay until they are idle.
    for agent in idle:
        if count <= pool_max:
            break
        if agent.name not in drain:
            drain.add(agent.name)
            count -= 1
    return drain


def _roll(
    active: list[AgentView],
    starting: int,
    version: str,
    desired: int,
    surge: int,
    unavailable: int,
) -> tuple[int, set[str]]:
    """Replace old-version agents: at most `desired + surge` active agents, at least
    `desired - unavailable` of them Ready. Returns (agents to start, agents to drain)."""
    old = [a for a in active if a.version != version]
    total = len(active) + starting
    new_count = total - len(old)
    start = max(min(desired - new_count, desired + surge - total), 0)
    ready = sum(1 for a in active if a.ready and not a.lost)
    may_lose = ready - (desired - unavailable)
    # Never fewer than `desired - maxUnavailable` agents in total, counting replacements.
    excess = total + start - max(desired - unavailable, 0)
    drain: set[str] = set()
    # Unready and idle old agents first: draining them costs no availability / no sandbox.
    for agent in sorted(old, key=lambda a: (a.ready and not a.lost, not a.idle, a.name)):
        if excess <= 0:
            break
        counts = agent.ready and not agent.lost
        if counts and may_lose <= 0:
            continue
        drain.add(agent.name)
        excess -= 1
        if counts:
            may_lose -= 1
    return start, drain


def no_room(
    spec: SandboxPoolSpec,
    agents: Sequence[AgentView],
    *,
    namespace: str,
    pool: str,
    starting: bool,
    why: str,
) -> str | None:
    """None while the pool may still get a free slot without anyone's help (`starting`: an
    agent start is in flight); otherwise why not, the create's refusal (`why`: placement's own
    reason, kept when slots are free but not for this request, e.g. its ports)."""
    if starting:
        return None
    active = [a for a in agents if not a.draining]
    # Registered, never heard from: still starting (on a follower: the leader's start).
    if any(not a.ready and not a.lost for a in active):
        return None
    cap = spec.capacity
    if len(active) < cap.pool_max:
        return None
    if any(a.draining and a.ready and a.free > 0 for a in agents):
        return None  # the pool loop takes a draining agent back when it is needed
    ready = [a for a in active if a.ready]
    if any(a.free > 0 for a in ready):
        return why
    total = sum(a.capacity for a in ready)
    used = sum(max(a.used, a.agent_used) for a in ready)
    command = f"fsb pool scale {pool} --min {cap.pool_min} --max {cap.pool_max + 1}"
    if namespace != "default":
        command += f" -n {namespace}"
    return (
        f"pool {namespace}/{pool} is full ({used} of {total} slots in use on {len(active)} of "
        f"poolMax {cap.pool_max} agents); delete a sandbox or raise its poolMax: `{command}`"
    )
