"""The agent's core: sandboxes on one agent, with no gRPC in sight.

Why it is shaped this way:
- Capacity and draining are decided here, not only in the control plane's registry (the slots'
  bookkeeping is `capacity.py`); the count is re-read from the runtime only when the agent looks
  full, because sandboxes exit without telling us.
- Every container this agent makes carries the label `fastsandbox.io/agent=<name>`; status and
  start-up read the runtime by that label, so an agent that restarts finds its sandboxes again
  (they belong to containerd's shims, not to this process), and an agent never touches a container
  of another agent sharing the same containerd namespace.
- Work on one sandbox id is serialised by a per-id lock; different ids never wait on each other.
- Logs are read from the files `fsb-logger` (started by containerd's shim, not by us) writes, so
  they survive agent restarts; reading them is `logs.py`.
- Each sandbox's supervisor channel (`supervisor.ChannelHub`) listens from before its container
  is made until it is deleted; a restarted agent listens again for every sandbox it adopts, and
  their supervisors redial. Work inside a sandbox goes through `supervisor(id)`, which refuses a
  sandbox that is not running with the state it is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import replace
from pathlib import Path

from fastsandbox._aio.keyed import KeyedLocks
from fastsandbox.agent.capacity import Capacity
from fastsandbox.agent.image_cache import ImageCache
from fastsandbox.agent.logs import LogChunk, log_files, read_log
from fastsandbox.agent.network.for_agent import network_for
from fastsandbox.agent.network.private import SandboxNet
from fastsandbox.agent.requests import (
    AgentStatus,
    PullResult,
    SandboxRequest,
    check_id,
    is_live,
    outward,
    sandbox_id_of,
)
from fastsandbox.agent.runtime.base import (
    ContainerState,
    ContainerStatus,
    ProcessDefaults,
    Runtime,
)
from fastsandbox.agent.specs import SpecBuilder
from fastsandbox.agent.supervisor import ChannelHub, SupervisorClient
from fastsandbox.agent.warm import ClaimUncertain, SlotKind, WarmSlots, counts_reader
from fastsandbox.api import labels
from fastsandbox.api.images import normalize_image_ref
from fastsandbox.errors import (
    AlreadyExists,
    CapacityExhausted,
    FailedPrecondition,
    FsbError,
    InvalidArgument,
    NotFound,
)
from fastsandbox.metrics import Metrics
from fastsandbox.settings import AgentSettings

log = logging.getLogger(__name__)

AGENT_LABEL = labels.AGENT_LABEL
WARM_SLOT_LABEL = labels.WARM_SLOT_LABEL
# How long a create that finds the agent's room held by warm slots being made or removed waits
# for them (a slot takes well under a second to make, a few under a burst's load).
ROOM_WAIT_SECONDS = 10.0


class SandboxManager:
    def __init__(self, runtime: Runtime, settings: AgentSettings) -> None:
        self.runtime = runtime
        self.metrics = Metrics("agent")
        self.metrics.gauge(
            "fsb_slots",
            "This agent's sandbox slots: capacity, and in use (in-flight creates too).",
            ("state",),
            lambda: {("capacity",): self.settings.capacity, ("used",): self.used_slots},
        )  # fmt: skip
        self.settings = settings
        self._locks = KeyedLocks()
        # Create tasks, kept referenced until done (they outlive a caller that went away).
        self._detached: set[asyncio.Task[ContainerState]] = set()
        # Images present here (a miss only costs a no-op pull), and who may use a cached one.
        self.images = ImageCache(runtime, self.metrics)
        self._closing = asyncio.Event()
        # Supervisor channels exist only when sandboxes get a supervisor as PID 1.
        self.channels = ChannelHub(settings.state_dir) if settings.init_path else None
        self.specs = SpecBuilder(settings, self.channels)
        # Process env/cwd/user of each sandbox, read once from the runtime per agent life.
        self._defaults: dict[str, ProcessDefaults] = {}
        # A network namespace per sandbox (networkMode private); None: sandboxes join the
        # agent's namespace (shared).
        self.network = network_for(settings)
        self.capacity = Capacity(settings, shared_ports=self.network is None)
        # Sandbox id → container id where they differ (claimed warm slots), from the
        # sandbox-id label; and every sandbox id the runtime showed at the last look.
        self._containers: dict[str, str] = {}
        self._seen: set[str] = set()
        # Warm slots the last look found that no live WarmSlots knows (left by a killed agent).
        self._stale_warm: list[ContainerState] = []
        self._warm_listed: set[str] = set()
        self.warm = self._warm_slots(settings)
        if self.warm is not None:
            warm = self.warm
            self.capacity.warm_count = warm.count
            self.capacity.retire_warm = warm.retire_one
        self.metrics.gauge(
            "fsb_warm_slots", "Warm slots ready to be claimed, per image.", ("image",),
            counts_reader(lambda: self.warm),
        )  # fmt: skip

    # -- lifecycle ------------------------------------------------------------------------------
    def log_path(self, container_id: str) -> Path:
        return self.specs.log_path(container_id)

    async def start(self) -> None:
        """Adopt what already runs for this agent (a restart) and learn the cached images."""
        self.specs.log_dir.mkdir(parents=True, exist_ok=True)
        states = await self._refresh_slots()
        if self.network is not None:
            # Every container that still exists keeps its namespace until it is deleted (an
            # exited one too: its record may be reset or read); the rest are cleaned.
            # Warm slots left by an earlier agent process too: each is removed below
            # (`WarmSlots.adopt`), and its namespace released with it.
            adopt = {sid: st.labels for sid, st in states.items()}
            if self.warm is not None:
                adopt.update((st.id, st.labels) for st in self._stale_warm)
            await self.network.start(adopt)
        if self.channels is not None:
            for _, state in sorted(states.items()):
                if is_live(state):
                    await self.channels.open(state.id)
        self.images.learn(image.name for image in await self.runtime.images())
        if self.warm is not None:
            self.warm.adopt(self._stale_warm)
            self.warm.start()
            self.warm.poke()
        log.info(
            "agent manager started",
            extra={"agent": self.settings.name, "sandboxes": len(self.capacity.held)},
        )

    def close(self) -> None:
        """Ask log followers to end (so a server shutdown does not wait on them)."""
        self._closing.set()

    async def aclose(self) -> None:
        """Stop listening for supervisors (sandboxes keep running; their directories stay)."""
        self.close()
        if self.warm is not None:
            await self.warm.close()
        if self.network is not None:
            await self.network.close()
        if self.channels is not None:
            await self.channels.close()

    def _warm_slots(self, settings: AgentSettings) -> WarmSlots | None:
        if settings.warm_slots <= 0:
            return None
        if self.channels is None:
            log.warning(
                "warm slots need fsb-supervisor (--init-path); this agent keeps none",
                extra={"agent": settings.name, "runtime": settings.runtime},
            )
            return None
        return WarmSlots(
            self,
            per_image=settings.warm_slots,
            images=settings.warm_images,
            recent=settings.warm_recent,
        )

    def free_slots(self) -> int:
        """Capacity neither a sandbox nor a warm slot holds."""
        return self.capacity.free()

    def _container_id(self, sandbox_id: str) -> str:
        return self._containers.get(sandbox_id, sandbox_id)

    # -- create / delete ------------------------------------------------------------------------
    async def create(self, req: SandboxRequest) -> ContainerState:
        check_id(req.sandbox_id)
        if not req.image:
            raise InvalidArgument("image: required")
        normalize_image_ref(req.image)  # a bad reference fails before a slot is taken
        self.specs.log_cap(req.log_max_bytes)  # so does a bad log cap
        self.specs.disk(req.disk_bytes)  # and a bad disk size
        # A create runs to its end even when its caller goes away (a control plane killed or
        # timed out mid-call): Status reports a create in flight as a sandbox on its way, and a
        # restarted control plane adopts it on that word; cut off, the create would be rolled
        # back under the record rebuilt for it. A caller that no longer wants the sandbox
        # deletes it, and the delete waits for the create on the sandbox's lock.
        task = asyncio.get_running_loop().create_task(
            self._create_held(req), name=f"create {req.sandbox_id}"
        )
        self._detached.add(task)
        task.add_done_callback(self._create_done)
        return await asyncio.shield(task)

    def _create_done(self, task: asyncio.Task[ContainerState]) -> None:
        self._detached.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Reported to the caller if it is still there; the runtime logged the failure.
            log.debug("create failed", extra={"task": task.get_name()})

    async def _create_held(self, req: SandboxRequest) -> ContainerState:
        began = time.perf_counter()
        async with self._locks.hold(req.sandbox_id):
            image = normalize_image_ref(req.image)
            if image in self.images:
                # Cached (a warm slot's image is too): a private one needs the caller's proof.
                await self.images.check_cached(image, req.pull_credentials)
            state = await self._claim(req)
            if state is None:
                state = await self._create_cold(req)
        if self.warm is not None:
            self.warm.learn_limits(req.image, req.cpu_millis, req.memory_bytes, req.pids_limit)
            self.warm.served(self._slot_kind(req))
        self.metrics.create_seconds.labels(mode="agent", warm=str(state.warm).lower()).observe(
            time.perf_counter() - began
        )
        return outward(state)

    async def _claim(self, req: SandboxRequest) -> ContainerState | None:
        """The create served from a warm slot, or None (no slot: the cold path). Only for a
        sandbox id never seen here (a retry of an earlier create takes the cold path, which
        returns what exists), and only when the slot was made as this create would make it."""
        warm, sandbox_id = self.warm, req.sandbox_id
        if warm is None:
            return None
        slots = self.capacity
        fresh = sandbox_id not in slots.held and sandbox_id not in self._containers
        fresh = fresh and sandbox_id not in self._seen and not slots.cordoned
        if fresh:
            slots.check_ports(sandbox_id, req.exposed_ports)
        same_log = self.specs.log_cap(req.log_max_bytes) == self.settings.log_max_bytes
        # A slot's writable layer was made at the default size: another size takes the cold path.
        same_disk = self.specs.disk(req.disk_bytes) == self.specs.disk(0)
        kind = self._slot_kind(req)
        slot = warm.take(kind) if fresh and same_log and same_disk else None
        if slot is None:
            self.metrics.warm_slot_claims_total.labels(result="miss").inc()
            return None
        # The slot's capacity becomes the sandbox's: no capacity check, nothing to wait for.
        slots.take(sandbox_id, req.exposed_ports)
        slots.creating.add(sandbox_id)
        self._containers[sandbox_id] = slot
        try:
            # A private pool: the slot's namespace becomes the sandbox's, its ports published.
            net = await warm.claim_network(slot, sandbox_id, req.exposed_ports)
            state = await warm.claim(slot, self.specs.sandbox(req, net))
        except BaseException as exc:
            slots.held.discard(sandbox_id)
            self._containers.pop(sandbox_id, None)
            if isinstance(exc, CapacityExhausted):
                # No host port left (nothing was taken): refused as a cold create would be;
                # the slot, untouched, stays ready.
                warm.put_back(kind, slot)
                raise
            warm.retire(slot)
            if not isinstance(exc, Exception) or isinstance(exc, ClaimUncertain):
                raise
            log.warning(
                "warm slot claim failed; creating cold",
                extra={"sandbox_id": sandbox_id, "slot": slot, "err": str(exc)},
            )
            self.metrics.warm_slot_claims_total.labels(result="miss").inc()
            return None
        finally:
            slots.creating.discard(sandbox_id)
        warm.claimed(slot)
        # What its processes inherit is known now (the runtime has it from the claim while its
        # record is being written): the first exec needs no runtime call for it.
        with contextlib.suppress(FsbError):
            self._defaults[sandbox_id] = await self.runtime.process_defaults(slot)
        self.metrics.warm_slot_claims_total.labels(result="hit").inc()
        # Debug, not info: a formatted record costs 0.2 to 0.4 ms here, a tenth of a claim; the
        # create's own events and metrics (warm hits) say the same.
        log.debug(
            "sandbox created from a warm slot",
            extra={"agent": self.settings.name, "sandbox_id": sandbox_id, "slot": slot},
        )
        return state

    def _slot_kind(self, req: SandboxRequest) -> SlotKind:
        assert self.warm is not None
        return self.warm.kind(req.image, req.cpu_millis, req.memory_bytes, req.pids_limit)

    async def _create_cold(self, req: SandboxRequest) -> ContainerState:
        claimed = self._containers.get(req.sandbox_id)
        if claimed is not None:
            # A retry of a create a warm slot served: that container is the sandbox.
            with contextlib.suppress(NotFound):
                return await self.runtime.get(claimed)
            self._containers.pop(req.sandbox_id, None)
        slots = self.capacity
        held_before = req.sandbox_id in slots.held
        await self._reserve(req.sandbox_id, req.exposed_ports)
        slots.creating.add(req.sandbox_id)
        try:
            if self.channels is not None:
                await self.channels.open(req.sandbox_id)
            state = await self._create(req)
        except BaseException:
            if not held_before:
                slots.held.discard(req.sandbox_id)
                if self.channels is not None:
                    await self.channels.remove(req.sandbox_id)
            raise
        finally:
            slots.creating.discard(req.sandbox_id)
        if not is_live(state):
            # Idempotent re-create of a sandbox that has already finished: no slot used.
            slots.held.discard(req.sandbox_id)
        return state

    async def _reserve(self, sandbox_id: str, ports: tuple[int, ...] = ()) -> None:
        """Take a slot for `sandbox_id`, or raise CapacityExhausted. Atomic between awaits:
        the cordon and the ports are checked in the same step that adds a new slot."""
        slots = self.capacity
        if sandbox_id in slots.held or slots.take_if_room(sandbox_id, ports):
            return  # held already: a retry of a create that holds its slot
        # Looks full (or cordoned): sandboxes may have exited since we last looked, and a
        # retried create of a sandbox that exists is returned whatever the count or cordon.
        states = await self._refresh_slots()
        existing = states.get(sandbox_id)
        if existing is not None:
            if is_live(existing):
                slots.held.add(sandbox_id)
            return
        if sandbox_id in slots.held:
            return
        # Capacity a slot being made (or removed) holds is no sandbox's: wait for it rather
        # than refuse a create on an agent running fewer sandboxes than it holds.
        deadline = time.monotonic() + ROOM_WAIT_SECONDS
        while True:
            slots.check_not_cordoned()
            if slots.take_if_room(sandbox_id, ports):
                return
            left = deadline - time.monotonic()
            if self.warm is None or left <= 0 or not await self.warm.settle_one(left):
                raise slots.full()

    def cordon(self, cordoned: bool) -> bool:
        """Refuse (True) or accept again (False) new sandboxes. Returns whether this changed
        anything; creates already past the check finish and keep their slots."""
        changed = self.capacity.cordon(cordoned)
        if self.warm is not None:
            self.warm.poke()  # cordoned: retire the slots; uncordoned: make them again
        return changed

    @property
    def cordoned(self) -> bool:
        return self.capacity.cordoned

    async def _refresh_slots(self) -> dict[str, ContainerState]:
        """Re-count slots from the runtime, keeping what changed while we were asking."""
        before = set(self.capacity.held)
        creating = set(self.capacity.creating)
        listed = await self.runtime.list(labels={AGENT_LABEL: self.settings.name})
        states: dict[str, ContainerState] = {}
        self._stale_warm = []
        self._warm_listed = set()
        for state in listed:
            if WARM_SLOT_LABEL in state.labels:
                self._warm_listed.add(state.id)
                if self.warm is None or not self.warm.is_slot(state.id):
                    self._stale_warm.append(state)
                continue
            sandbox_id = sandbox_id_of(state)
            states[sandbox_id] = state
            if sandbox_id != state.id:
                self._containers[sandbox_id] = state.id
        self._seen = set(states)
        self.capacity.recount(states, before, creating)
        return states

    async def _create(self, req: SandboxRequest) -> ContainerState:
        if self.network is None:
            return await self._create_in(req, None)
        existing = self.network.get(req.sandbox_id)
        try:
            net = await self.network.acquire(req.sandbox_id)
        except CapacityExhausted:
            # Warm slots hold addresses as they hold capacity: one gives its address up.
            if self.warm is None or not await self.warm.free_address():
                raise
            net = await self.network.acquire(req.sandbox_id)
        try:
            await self.network.publish(net, req.exposed_ports)
            return await self._create_in(req, net)
        except BaseException:
            if existing is None:
                # Nothing half-made: a failed create gives its namespace, rules and ports back.
                await asyncio.shield(self.network.release(net))
            raise

    async def _create_in(self, req: SandboxRequest, net: SandboxNet | None) -> ContainerState:
        spec = self.specs.sandbox(req, net)
        image = normalize_image_ref(req.image)
        # Time waiting for a pull (ours, or a concurrent create's of the same image) is what the
        # create's timings report as pulledMs.
        cold = image not in self.images
        began = time.monotonic()
        # Cached when the create began: its access was checked then (`_create_held`).
        await self.images.ensure(image, req.pull_credentials, checked=not cold)
        pulled = time.monotonic() - began if cold else 0.0
        try:
            state = await self.runtime.create(spec)
        except NotFound:
            # The image left the cache behind our back (pruned by someone): fetch it once more.
            self.images.forget(image)
            began = time.monotonic()
            await self.images.pull(image, req.pull_credentials)
            pulled += time.monotonic() - began
            state = await self.runtime.create(spec)
        if pulled:
            state = replace(state, pulled_ms=round(pulled * 1000, 3))
        owner = state.labels.get(AGENT_LABEL)
        if owner != self.settings.name:
            raise AlreadyExists(
                f"container id {req.sandbox_id} is already used by agent {owner or '(none)'}; "
                "use a new sandbox id"
            )
        log.info(
            "sandbox created",
            extra={"agent": self.settings.name, "sandbox_id": req.sandbox_id, "image": req.image},
        )
        return state

    async def delete(
        self, sandbox_id: str, grace_seconds: float = -1, *, keep_logs: bool = False
    ) -> bool:
        """Stop and remove the sandbox and (unless `keep_logs`) its log. False when it did not
        exist. With `keep_logs` the log stays readable through `logs()` until a later delete
        without it (an exited sandbox whose record is kept)."""
        check_id(sandbox_id)
        grace = self.settings.delete_grace_seconds if grace_seconds < 0 else grace_seconds
        async with self._locks.hold(sandbox_id):
            container_id = self._container_id(sandbox_id)
            state = await self._own_state(sandbox_id)
            existed = False
            if state is not None:
                existed = await self.runtime.delete(container_id, grace)
            if self.network is not None:
                net = self.network.get(sandbox_id)
                if net is not None:
                    await self.network.release(net)
            self.capacity.held.discard(sandbox_id)
            self._defaults.pop(sandbox_id, None)
            if not keep_logs:
                # Kept with the log: a warm slot's sandbox id still finds its container's log.
                self._containers.pop(sandbox_id, None)
            if self.channels is not None:
                await self.channels.remove(container_id)
            for path in () if keep_logs else log_files(self.log_path(container_id)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if self.warm is not None:
            self.warm.poke()  # room for a slot again
        if existed:
            log.info(
                "sandbox deleted", extra={"agent": self.settings.name, "sandbox_id": sandbox_id}
            )
        return existed

    async def _own_state(self, sandbox_id: str) -> ContainerState | None:
        """The sandbox's state (by container id), or None when it does not exist or belongs to
        another agent."""
        container_id = self._container_id(sandbox_id)
        try:
            state = await self.runtime.get(container_id)
        except NotFound:
            return None
        if WARM_SLOT_LABEL in state.labels or sandbox_id_of(state) != sandbox_id:
            return None  # a warm slot is no sandbox, and a slot's id names none
        if state.labels.get(AGENT_LABEL) != self.settings.name:
            log.warning(
                "container belongs to another agent; not touching it",
                extra={"sandbox_id": sandbox_id, "owner": state.labels.get(AGENT_LABEL)},
            )
            return None
        return state

    # -- inside a sandbox -----------------------------------------------------------------------
    async def supervisor(self, sandbox_id: str) -> tuple[SupervisorClient, ProcessDefaults]:
        """The sandbox's supervisor and what its processes inherit. NotFound for an unknown
        sandbox, FailedPrecondition (naming its state) when it is not running, Unavailable
        when its supervisor does not connect in time (`Channel.control`)."""
        check_id(sandbox_id)
        container_id = self._container_id(sandbox_id)
        channel = self.channels.get(container_id) if self.channels is not None else None
        if channel is not None and channel.connected and sandbox_id in self._defaults:
            # A connected supervisor is the sandbox's PID 1 alive: it is running, and ours
            # (channels exist only for our sandboxes). Saves a runtime call per exec.
            return SupervisorClient(channel), self._defaults[sandbox_id]
        state = await self.get(sandbox_id)
        if state.status is not ContainerStatus.RUNNING:
            how = f" (exit code {state.exit_code})" if state.exit_code is not None else ""
            raise FailedPrecondition(
                f"sandbox {sandbox_id} is {state.status.value}{how}, not running"
            )
        client = self.channels.client(container_id) if self.channels is not None else None
        if client is None and self.channels is not None:
            # Running but not listened for: adopted by a racing start, or made by an older agent.
            await self.channels.open(container_id)
            client = self.channels.client(container_id)
        if client is None:
            raise FailedPrecondition(
                f"sandbox {sandbox_id} has no supervisor: agent {self.settings.name} runs "
                "sandboxes without one (no init binary found; see --init-path)"
            )
        defaults = self._defaults.get(sandbox_id)
        if defaults is None:
            defaults = await self.runtime.process_defaults(container_id)
            self._defaults[sandbox_id] = defaults
        return client, defaults

    # -- status / images ------------------------------------------------------------------------
    async def get(self, sandbox_id: str) -> ContainerState:
        check_id(sandbox_id)
        state = await self._own_state(sandbox_id)
        if state is None:
            raise NotFound(f"sandbox {sandbox_id} not found on agent {self.settings.name}")
        return outward(state)

    async def status(self) -> AgentStatus:
        slots = self.capacity
        creating = set(slots.creating)
        net_seq = self.network.seq + 1 if self.network is not None else 0
        states, images = await asyncio.gather(self._refresh_slots(), self.runtime.images())
        self.images.learn(i.name for i in images)
        # A container whose create was in flight while we read has no task yet in that read, and
        # the runtime shows it stopped; it must not read as "exited" to the control plane.
        for sandbox_id in (creating | slots.creating) & states.keys():
            states[sandbox_id] = replace(
                states[sandbox_id], status=ContainerStatus.CREATED, exit_code=None, reason=""
            )
        if self.network is not None:
            # Containers removed without a delete through us (the janitor's orphan sweep, a
            # hand `ctr rm`): their namespace, rules and host ports go too.
            present = {sandbox_id_of(st) for st in states.values()} | creating | slots.creating
            # Warm slots' nets are theirs to release (`WarmSlots._remove`) while they exist.
            present |= self._warm_listed | (self.warm.ids() if self.warm is not None else set())
            for net in self.network.stale(present, net_seq):
                log.info(
                    "releasing the network of a vanished sandbox",
                    extra={"sandbox_id": net.sandbox_id},
                )
                await self.network.release(net)
        # Read after the refresh, with no await since: a create refused or counted here.
        warm = self.warm
        return AgentStatus(
            sandboxes=sorted((outward(s) for s in states.values()), key=lambda s: s.id),
            images=images,
            cordoned=slots.cordoned,
            # Slots being made or removed hold capacity too (a drain waits for them).
            used_slots=len(slots.held) + (warm.busy() if warm is not None else 0),
            creating=len(slots.creating),
            warm=warm.counts() if warm is not None else [],
        )

    async def pull(self, image: str) -> PullResult:
        if not image:
            raise InvalidArgument("image: required")
        began = time.monotonic()
        info = await self.images.pull(normalize_image_ref(image))
        return PullResult(info, time.monotonic() - began)

    # -- logs -----------------------------------------------------------------------------------
    async def logs(
        self,
        sandbox_id: str,
        *,
        follow: bool = False,
        tail_lines: int = 0,
        since_unix: float = 0.0,
    ) -> AsyncGenerator[LogChunk, None]:
        """The sandbox's output, stdout and stderr apart: the last `tail_lines` lines (0 = all)
        written at or after `since_unix` (0 = all), then, with `follow`, new output as it is
        written until the sandbox is gone, or has exited and all is read."""
        check_id(sandbox_id)
        if tail_lines < 0:
            raise InvalidArgument(f"tail_lines {tail_lines}: must be 0 (all) or positive")
        path = self.log_path(self._container_id(sandbox_id))
        state = await self._own_state(sandbox_id)
        if state is None and not any(p.exists() for p in log_files(path)):
            raise NotFound(f"sandbox {sandbox_id} not found on agent {self.settings.name}")

        async def running() -> bool:
            current = await self._own_state(sandbox_id)
            return current is not None and is_live(current)

        stream = read_log(
            path,
            tail_lines=tail_lines,
            since_unix=since_unix,
            follow=follow and state is not None,
            running=running,
            closing=self._closing,
        )
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    @property
    def used_slots(self) -> int:
        """Sandboxes counted against capacity (for diagnostics)."""
        return len(self.capacity.held)
