"""Warm slots: containers made before any request asks for them, claimed by creates.

A warm slot is a sandbox container of a hot image with everything a cold create makes —
snapshot, cgroup, network namespace, the log capture, the supervisor running and connected —
but no main process: its PID 1 is `fsb-supervisor --warm`. A create of that image claims one
(`Runtime.claim`: limits through containerd, then the supervisor's `start_main`, which sets
the hostname from inside, then the record), which costs a few milliseconds instead of a whole
container start.

Why it is shaped this way:
- Hot images: the pool's `prewarmImages` (`--warm-image`), then the images this agent served
  most recently (`--warm-recent`), each with `--warm-slots` slots.
- Capacity: slots only ever fill capacity no sandbox uses, so containers on an agent never
  exceed its capacity. They are not counted as used: a create of any image may land here, and
  when no room is left it retires a slot (of the least hot image) to make room. Slots being made
  or removed are counted as used (`busy`): they hold resources no create can claim.
- Refill runs in one background task, one slot at a time, never on a request's path; a create
  only pokes it. It also yields to creates: a slot is made only once no create has been served
  for `REFILL_QUIET_SECONDS` (or the refill has waited `REFILL_MAX_DEFER_SECONDS`), so a burst
  of claims does not share its CPU with the containers made to replace them (a slot costs
  a whole cold create: shim, `runc create`, snapshot).
- Container ids never change in containerd, so a claimed slot keeps its id (`w-<hex>`): the
  manager maps sandbox id → container id, rebuilt after a restart from the sandbox-id label
  the claim records. Channel directories and log files are named by container id.
- Recovery: a restarted agent removes unclaimed slots it finds (one cut mid-claim may already
  run a main process that no create acknowledged) and makes fresh ones.
- Private networks: each slot is made in a namespace of its own, acquired from the agent's
  `PrivateNetwork` under the slot's container id (address, veth and the agent's filter rules are
  in place before any request; the index label lets a restarted agent adopt it, so it is
  released once the slot is removed, never left behind or handed out twice). A claim hands the
  net to the sandbox id (`PrivateNetwork.assign`) and publishes the request's ports before the
  main process starts; the record the claim writes carries the labels a cold create's has, so
  endpoints, recovery and delete read the same. Slots hold addresses as they hold capacity:
  refill takes only spare ones, and a cold create that finds none gives up a slot for one.
- Every agent with the supervisor keeps slots, an agent Pod with every capability dropped
  and gVisor included: a claim does nothing to the sandbox from the agent's own process (the
  supervisor sets the hostname, containerd's shim the limits; runtime/warm_claim.py).
- Limits under runc: a claim can change a slot's limits (containerd's `Tasks.Update`, one `runc
  update`: 8 to 30 ms here, the largest step of a claim when taken), but need not. A slot is made
  with the limits the last create of its image asked for (`learn_limits`), and before any
  create with the pool's defaults (below), so the next create asking the same skips it; one
  asking other limits still claims the slot and pays the update.
- Kinds: a slot is made for a `SlotKind` — an image, and where the runtime cannot change a
  running sandbox's limits (gVisor, `limits_fixed`), the limits too. There a create claims only
  a slot made with exactly its limits; pinned images get slots of the default limits, and a
  served create makes its own kind hot.
- Default limits: slots are made with the limits a create of the pool's defaults asks for
  (`--slot-cpu-millis`/`--slot-memory-bytes`/`--slot-pids`, which the fleets fill from the
  pool's `sandboxDefaults` and the control plane's defaults), so the common claim changes no
  limit: no `Tasks.Update`, no `runc update` process on the request's path. Under runc a
  create asking other limits still claims a slot of its image (the claim changes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fastsandbox.agent.logs import log_files
from fastsandbox.agent.network.for_agent import net_labels
from fastsandbox.agent.runtime.base import ContainerSpec, ContainerState, MainProcess
from fastsandbox.agent.runtime.oci_spec import DEFAULT_PIDS_LIMIT
from fastsandbox.agent.runtime.warm_claim import limits_fixed
from fastsandbox.api import labels
from fastsandbox.api.images import normalize_image_ref
from fastsandbox.errors import CapacityExhausted, FsbError, RuntimeFailure

if TYPE_CHECKING:
    from fastsandbox.agent.manager import SandboxManager
    from fastsandbox.agent.network.private import SandboxNet

log = logging.getLogger(__name__)

# The refill waits for this long without a served create before it makes a slot (a burst's
# creates come every few milliseconds) ...
REFILL_QUIET_SECONDS = 0.2
# ... but never longer than this, so a steady stream of creates still gets its slots back.
REFILL_MAX_DEFER_SECONDS = 2.0

SLOT_PREFIX = "w-"
# A slot that could not be made is tried again after this, doubling up to the cap, until one is
# made (then from the start again).
RETRY_SECONDS = 2.0
RETRY_MAX_SECONDS = 30.0
REFILL_DELAY_SECONDS = 0.02


class ClaimUncertain(RuntimeFailure):
    """A claim failed after `start_main` was sent: the user's process may be running, so the
    create must not be tried again cold (that could run the command twice)."""


@dataclass(frozen=True, slots=True)
class SlotKind:
    """What a slot is made for: an image and (where limits cannot change later) the limits;
    None there = the agent's defaults (no cpu/memory limit, the default pids limit)."""

    image: str
    cpu_millis: int | None = None
    memory_bytes: int | None = None
    pids_limit: int | None = None


@dataclass(frozen=True, slots=True)
class WarmCounts:
    image: str
    ready: int


def slot_id() -> str:
    return SLOT_PREFIX + secrets.token_hex(8)


class WarmSlots:
    def __init__(
        self,
        manager: SandboxManager,
        *,
        per_image: int,
        images: Sequence[str],
        recent: int,
    ) -> None:
        self.manager = manager
        self.per_image = per_image
        self.recent_max = recent
        s = manager.settings
        self.by_limits = limits_fixed(s.runtime)
        # What a slot is made with when its kind does not say (runc: every slot).
        self.defaults = self._kind_of("", s.slot_cpu_millis, s.slot_memory_bytes, s.slot_pids)
        self.pinned = [
            self.kind(i, s.slot_cpu_millis, s.slot_memory_bytes, s.slot_pids) for i in images
        ]
        self._recent: OrderedDict[SlotKind, None] = OrderedDict()
        # Image → the limits of its last create: what its next slots are made with (runc; see
        # the module doc). An image no create asked for yet gets `defaults`.
        self._asked: dict[str, SlotKind] = {}
        self._ready: dict[SlotKind, deque[str]] = {}
        self._making: dict[SlotKind, int] = {}
        self._retiring: set[str] = set()
        # Container ids of slots being made (their net may exist before their container).
        self._making_ids: set[str] = set()
        # Slot container id → its private network, until a claim succeeds or it is removed.
        self._nets: dict[str, SandboxNet] = {}
        # Cold creates waiting for an address a retired slot gives back: refill keeps off it.
        self._address_waiters = 0
        self._wake = asyncio.Event()
        # Set whenever a slot being made or removed is done with (creates waiting for room).
        self._settled = asyncio.Event()
        # time.monotonic() of the last served create (the refill keeps out of its way).
        self.clock: Callable[[], float] = time.monotonic
        self._last_served = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._removals: set[asyncio.Task[None]] = set()

    # -- what is there --------------------------------------------------------------------------
    def kind(
        self,
        image: str,
        cpu_millis: int | None = None,
        memory_bytes: int | None = None,
        pids_limit: int | None = None,
    ) -> SlotKind:
        """The kind of slot a create of `image` with these limits can claim."""
        image = normalize_image_ref(image)
        if not self.by_limits:
            return SlotKind(image)
        return self._kind_of(image, cpu_millis, memory_bytes, pids_limit)

    @staticmethod
    def _kind_of(
        image: str, cpu_millis: int | None, memory_bytes: int | None, pids_limit: int | None
    ) -> SlotKind:
        """Limits as a slot is made with them: 0 and None alike, the default pids as None."""
        if pids_limit == DEFAULT_PIDS_LIMIT:
            pids_limit = None  # what a slot of the defaults has
        return SlotKind(image, cpu_millis or None, memory_bytes or None, pids_limit or None)

    def hot(self) -> list[SlotKind]:
        """Kinds to keep slots for, hottest first."""
        out = list(dict.fromkeys(self.pinned))
        for kind in reversed(self._recent):
            if kind not in out:
                out.append(kind)
        return out

    def ready(self) -> int:
        return sum(len(q) for q in self._ready.values())

    def busy(self) -> int:
        """Slots being made or removed: capacity no create can claim."""
        return sum(self._making.values()) + len(self._retiring)

    def count(self) -> int:
        """Every container of ours that is not a sandbox."""
        return self.ready() + self.busy()

    def counts(self) -> list[WarmCounts]:
        """Ready slots per image (of every kind)."""
        ready: dict[str, int] = {}
        for kind in set(self.hot()) | set(self._ready):
            ready[kind.image] = ready.get(kind.image, 0) + len(self._ready.get(kind, ()))
        return [WarmCounts(i, n) for i, n in sorted(ready.items())]

    def ids(self) -> set[str]:
        """Container ids of every slot being made, ready or being removed."""
        ready = {cid for q in self._ready.values() for cid in q}
        return ready | self._making_ids | self._retiring

    def ready_ids(self) -> set[str]:
        """Container ids of the ready slots (for tests and diagnostics)."""
        return {cid for queue in self._ready.values() for cid in queue}

    def is_slot(self, container_id: str) -> bool:
        return container_id.startswith(SLOT_PREFIX) and (
            container_id in self._retiring or any(container_id in q for q in self._ready.values())
        )

    # -- claims ---------------------------------------------------------------------------------
    def served(self, kind: SlotKind) -> None:
        """A create of `kind` was served (from a slot or cold): it is hot now. The refill
        starts a moment later, so its synchronous work (specs, records) does not hold up the
        answer still on its way out through this event loop."""
        if self.recent_max > 0:
            self._recent.pop(kind, None)
            self._recent[kind] = None
            while len(self._recent) > self.recent_max:
                self._recent.popitem(last=False)
        self._last_served = self.clock()  # the refill keeps out of a burst's way (`_quiet`)
        asyncio.get_running_loop().call_later(REFILL_DELAY_SECONDS, self.poke)

    def learn_limits(self, image: str, cpu_millis: int, memory_bytes: int, pids_limit: int) -> None:
        """A create of `image` asked for these limits (0 = the default): slots made from now
        on have them, so a claim asking the same needs no limits update."""
        image = normalize_image_ref(image)
        self._asked[image] = self._kind_of(image, cpu_millis, memory_bytes, pids_limit)

    def take(self, kind: SlotKind) -> str | None:
        """A ready slot of `kind` (no await: atomic with the caller's capacity check)."""
        queue = self._ready.get(kind)
        if not queue:
            return None
        return queue.popleft()

    def put_back(self, kind: SlotKind, container_id: str) -> None:
        """A slot taken for a claim that gave up before touching it: ready again, first."""
        self._own_net(container_id)
        self._ready.setdefault(kind, deque()).appendleft(container_id)

    async def claim_network(
        self, container_id: str, sandbox_id: str, ports: Sequence[int]
    ) -> SandboxNet | None:
        """Hand slot `container_id`'s private network to `sandbox_id` and publish `ports` (None:
        no private network). CapacityExhausted (no host port left) leaves the net the slot's,
        as it was; any other failure leaves it to `retire` (which takes it back)."""
        network = self.manager.network
        if network is None:
            return None
        net = self._nets.get(container_id)
        if net is None:
            raise RuntimeFailure(f"warm slot {container_id} has no private network")
        network.assign(net, sandbox_id)
        try:
            await network.publish(net, ports)
        except CapacityExhausted:
            network.assign(net, container_id)
            raise
        return net

    def claimed(self, container_id: str) -> None:
        """The claim of `container_id` succeeded: its network is the sandbox's now."""
        self._nets.pop(container_id, None)

    def _own_net(self, container_id: str) -> None:
        """Give slot `container_id` its network back from a claim that did not succeed."""
        net = self._nets.get(container_id)
        network = self.manager.network
        if net is not None and network is not None and net.sandbox_id != container_id:
            network.assign(net, container_id)

    async def claim(self, container_id: str, spec: ContainerSpec) -> ContainerState:
        """Start `spec`'s main process in slot `container_id` and record it as the sandbox."""
        channels = self.manager.channels
        assert channels is not None  # warm slots exist only with supervisors
        channel = channels.get(container_id)
        if channel is None:
            channel = await channels.open(container_id)

        sent = False

        async def start(main: MainProcess) -> None:
            nonlocal sent
            await channel.control()  # connected: nothing is sent into a lost connection
            sent = True
            try:
                await channel.request(
                    "start_main",
                    argv=list(main.argv),
                    env=list(main.env),
                    cwd=main.cwd,
                    user=main.user,
                    # Set by the supervisor itself, before the main process starts.
                    **({"hostname": main.hostname} if main.hostname else {}),
                )
            except FsbError as exc:
                if not exc.message.startswith("exec "):
                    raise
                # Not executable: the supervisor ends the sandbox with 127/126 and the message
                # in its log, as a cold start does; the sandbox exists and reads as exited.
                log.info("main process not executable", extra={"sandbox": spec.id})

        try:
            return await self.manager.runtime.claim(container_id, spec, start)
        except Exception as exc:
            if not sent:
                raise
            raise ClaimUncertain(
                f"sandbox {spec.id}: warm slot {container_id} failed after its process was "
                f"started: {exc}"
            ) from exc

    def retire(self, container_id: str) -> None:
        """Remove a slot in the background (counted as busy until it is gone)."""
        self._own_net(container_id)
        self._retiring.add(container_id)
        task = asyncio.get_running_loop().create_task(self._remove(container_id))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    def retire_one(self) -> bool:
        """Retire a ready slot of the least hot image (room for a create). False: none."""
        order = self.hot()
        candidates = sorted(
            (i for i, q in self._ready.items() if q),
            key=lambda i: order.index(i) if i in order else len(order),
        )
        if not candidates:
            return False
        self.retire(self._ready[candidates[-1]].pop())
        return True

    def retire_all(self) -> None:
        for queue in self._ready.values():
            while queue:
                self.retire(queue.pop())

    async def settle_one(self, bound: float) -> bool:
        """For a create that found no room while slots are being made or removed: wait until
        one of them is done (made, `retire_one` can give it up; removed, its room is free).
        False: none is busy, or none was done within `bound` seconds."""
        if self.busy() == 0:
            return False
        self._settled.clear()
        try:
            await asyncio.wait_for(self._settled.wait(), bound)
        except TimeoutError:
            return False
        return True

    async def free_address(self) -> bool:
        """For a cold create that found no private address: wait for the slots being removed,
        retiring one first when none is. False: no slot holds one to give."""
        self._address_waiters += 1
        try:
            if not self._removals and not self.retire_one():
                return False
            await asyncio.gather(*self._removals, return_exceptions=True)
            return True
        finally:
            self._address_waiters -= 1

    def adopt(self, states: Sequence[ContainerState]) -> None:
        """After a restart: remove the unclaimed slots found (see the module doc)."""
        for state in states:
            log.info("removing a warm slot left by an earlier agent", extra={"slot": state.id})
            self.retire(state.id)

    # -- refill ---------------------------------------------------------------------------------
    def poke(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="warm slots")

    async def close(self) -> None:
        """Stop refilling (the slots stay: a restarted agent removes them)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    def _room(self) -> int:
        """Slots that may be made now: free capacity, and spare private addresses."""
        room = self.manager.free_slots()
        network = self.manager.network
        if network is not None:
            room = min(room, network.spare() - self._address_waiters)
        return room

    def _next_kind(self, free: int) -> SlotKind | None:
        if free <= 0 or self.manager.cordoned:
            return None
        for kind in self.hot():
            if len(self._ready.get(kind, ())) + self._making.get(kind, 0) < self.per_image:
                return kind
        return None

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.manager.cordoned:
                self.retire_all()
                continue
            while (kind := self._next_kind(self._room())) is not None:
                if await self._quiet():
                    # Room and kinds may have changed while it waited.
                    kind = self._next_kind(self._room())
                    if kind is None:
                        break
                try:
                    await self._make(kind)
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Then look again (room, kinds): nothing else may wake this loop, and a
                    # slot given up on would stay missing until the next create or delete.
                    failures += 1
                    delay = min(RETRY_SECONDS * 2 ** (failures - 1), RETRY_MAX_SECONDS)
                    log.warning(
                        "could not make a warm slot; retrying",
                        extra={"image": kind.image, "err": str(exc), "retry_in": delay},
                    )
                    await asyncio.sleep(delay)

    async def _quiet(self) -> bool:
        """Wait until no create was served for REFILL_QUIET_SECONDS, at most
        REFILL_MAX_DEFER_SECONDS from the first wait; True when it waited."""
        waited = False
        deadline = self.clock() + REFILL_MAX_DEFER_SECONDS
        while True:
            now = self.clock()
            left = min(self._last_served + REFILL_QUIET_SECONDS, deadline) - now
            if left <= 0:
                return waited
            waited = True
            await asyncio.sleep(min(left, REFILL_QUIET_SECONDS))

    async def _make(self, kind: SlotKind) -> None:
        manager = self.manager
        channels = manager.channels
        assert channels is not None
        cid = slot_id()
        image = kind.image
        self._making[kind] = self._making.get(kind, 0) + 1
        self._making_ids.add(cid)
        made = False
        try:
            await manager.images.ensure(image)
            channel = await channels.open(cid)
            slot_labels = {labels.AGENT_LABEL: manager.settings.name, labels.WARM_SLOT_LABEL: image}
            net = await self._acquire_net(cid)
            if net is not None:
                slot_labels.update(net_labels(net))  # adopted (then released) after a restart
            limits = kind if self.by_limits else self._asked.get(image, self.defaults)
            spec = replace(
                manager.specs.container(cid, image, slot_labels, warm=True),
                cpu_millis=limits.cpu_millis,
                memory_bytes=limits.memory_bytes,
                pids_limit=limits.pids_limit,
            )
            if net is not None:
                # In a Pod runc makes the namespace and the net's hook wires it (as cold).
                spec = replace(spec, netns_path=net.path or None, netns_hook=net.hook)
            await manager.runtime.create(spec)
            made = True
            await channel.control()  # ready only once its supervisor waits on the channel
            await channel.park()  # the claim's first exec then finds its data connection
        except BaseException:
            if made:
                self.retire(cid)
            else:
                with contextlib.suppress(FsbError):
                    await channels.remove(cid)
                await asyncio.shield(self._release_net(cid))
            raise
        finally:
            self._making[kind] -= 1
            self._making_ids.discard(cid)
            self._settled.set()
        if manager.cordoned:
            self.retire(cid)
            return
        self._ready.setdefault(kind, deque()).append(cid)
        log.debug("warm slot ready", extra={"slot": cid, "image": image})

    async def _acquire_net(self, container_id: str) -> SandboxNet | None:
        network = self.manager.network
        if network is None:
            return None
        net = await network.acquire(container_id)
        self._nets[container_id] = net
        return net

    async def _release_net(self, container_id: str) -> None:
        """Release the slot's network: the one it was made with, or (a slot of an earlier
        agent process) the one adopted under its container id."""
        network = self.manager.network
        if network is None:
            return
        net = self._nets.pop(container_id, None) or network.get(container_id)
        if net is not None:
            await network.release(net)

    async def _remove(self, container_id: str) -> None:
        manager = self.manager
        try:
            await manager.runtime.delete(container_id, 0)
            # Only once the container is gone: its namespace's index and veth name are
            # handed out again after this.
            await self._release_net(container_id)
            if manager.channels is not None:
                await manager.channels.remove(container_id)
            for path in log_files(manager.log_path(container_id)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        except Exception:
            # The janitor removes it once this agent is gone; while it lives it is ours.
            log.exception("could not remove a warm slot", extra={"slot": container_id})
        finally:
            self._retiring.discard(container_id)
            self._settled.set()
            self.poke()


GaugeValues = dict[tuple[str, ...], float]


def counts_reader(slots: Callable[[], WarmSlots | None]) -> Callable[[], GaugeValues]:
    """The `fsb_warm_slots` gauge: ready slots per image."""

    def read() -> GaugeValues:
        pool = slots()
        if pool is None:
            return {}
        return {(c.image,): float(c.ready) for c in pool.counts()}

    return read
