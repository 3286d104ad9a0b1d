"""Sandbox lifecycle operations shared by the Fast-Path and the reconciler.

Every operation on one sandbox runs inside that sandbox's serial section (`KeyedLocks`), so a
Fast-Path create, a user's delete and the reconciler never interleave on the same object, while
different sandboxes proceed in parallel.

- Fast mode answers first (DESIGN.md §5): allocate a slot, start the container on the agent,
  answer, then write the record (already Running) in the same serial section, retrying until it
  is stored (with `store_after_reply`, the controller: once the answer has left). Until then
  the record is served from memory (`get`, `list`, exec), so a `get` right after `run` finds
  it; a crash in between is repaired by recovery from the request label the container carries
  (`request_label`), so an acknowledged create survives a kill -9.
- Strong mode and declarative objects: the record exists first (Pending), then the same start
  path runs and the status becomes Running.
- Deletion goes through the `fastsandbox.io/cleanup` finalizer: the slot and ports are released
  only after the agent confirmed the container is gone; an agent error keeps the finalizer and
  the reconciler retries.
- A create that finds its pool full while the pool may still grow waits for the new agent
  (bounded by `scale_wait_seconds` and the caller's deadline; `wait_for_room`, the pool loop's,
  notes the demand, so the first such create starts the agent) and its timings say how long
  (`scaledMs`). It is refused (RESOURCE_EXHAUSTED) only when the pool cannot grow any more or
  the wait runs out.
Nothing is left half-made: a failure after the slot was taken releases it (and removes the
container when it was started), and a Strong-mode record that could not be placed is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta

from fastsandbox._aio.keyed import KeyedLocks
from fastsandbox.api import labels
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
from fastsandbox.api.images import PullCredentials, check_registry
from fastsandbox.api.labels import CLEANUP_FINALIZER
from fastsandbox.api.models import (
    ConsistencyMode,
    NetworkMode,
    Sandbox,
    SandboxPhase,
    SandboxPool,
    Timings,
    now,
)
from fastsandbox.api.phases import set_condition, transition
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.create_request import (
    CreateOptions,
    ReadCache,
    new_sandbox_id,
    request_label,
)
from fastsandbox.control.events import EventRecorder
from fastsandbox.control.limits import Limits, effective_limits, server_defaults
from fastsandbox.control.record_batch import RecordBatcher
from fastsandbox.control.registry import Allocation, Registry
from fastsandbox.control.sandbox_delete import SandboxDeletion
from fastsandbox.errors import (
    AlreadyExists,
    CapacityExhausted,
    Conflict,
    FsbError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from fastsandbox.settings import DEFAULT_SANDBOX_DISK
from fastsandbox.store.base import ObjectStore

log = logging.getLogger(__name__)

# The pull credentials of the create being served in this task (and the task it spawns), set by
# `create` from the request; None everywhere else.
_PULL_CREDENTIALS: contextvars.ContextVar[PullCredentials | None] = contextvars.ContextVar(
    "pull_credentials", default=None
)

IDEMPOTENCY_KEY = labels.IDEMPOTENCY_KEY_ANNOTATION
SPEC_HASH = labels.SPEC_HASH_ANNOTATION
MODE = labels.MODE_ANNOTATION

Key = tuple[str, str]


# How long a Fast create's record waits for its answer to leave before it is stored anyway.
REPLY_WAIT_SECONDS = 0.05

# Conditions that describe the previous container; a new one starts without them.
_RESET_ON_START = frozenset({"Ready", "Scheduled", "AgentReachable"})


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


def _after(ms: float | None) -> str:
    return f" after {ms:.1f} ms" if ms else ""


class SandboxService(SandboxDeletion):
    def __init__(
        self,
        store: ObjectStore,
        registry: Registry,
        agents: AgentClients,
        *,
        grace_seconds: float,
        default_cpu: str,
        default_memory: str,
        default_disk: str = DEFAULT_SANDBOX_DISK,
        allowed_registries: frozenset[str] | None = None,
        events: EventRecorder | None = None,
        scale_wait_seconds: float = 60.0,
    ) -> None:
        self.store = store
        self.registry = registry
        self.agents = agents
        # What `fsb describe` shows; the lifecycle, updates and recovery record through it too.
        self.events = events or EventRecorder(store)
        self.grace_seconds = grace_seconds
        self.default_cpu = default_cpu
        self.default_memory = default_memory
        self.default_disk = default_disk
        # Registries a sandbox's image may come from (None: any; the planes always pass one).
        self.allowed_registries = allowed_registries
        self.locks = KeyedLocks()
        self.started_at = time.monotonic()
        self._idempotency: dict[tuple[str, str], tuple[str, str]] = {}
        # container id -> sandbox key, so agent reports can wake the right sandbox.
        self.keys: dict[str, Key] = {}
        # With several control-plane replicas (Kubernetes): bring this replica's view of a
        # pool's agents up to date (namespace, pool) → whether it gained a ready agent. A create
        # that finds no room asks once before refusing: another replica may have just started
        # the agent.
        self.refresh_agents: Callable[[str, str], Awaitable[bool]] | None = None
        # `PoolManager.wait_for_room` (namespace, pool, request key, until, why): returns once
        # the pool may have room, raises CapacityExhausted when it cannot grow or at `until`.
        # None: a create that finds no room is refused at once.
        self.wait_for_room: Callable[[str, str, str, float, str], Awaitable[None]] | None = None
        self.scale_wait_seconds = scale_wait_seconds
        # Fast creates answered and not stored yet, and the tasks storing them.
        self.unstored: dict[Key, Sandbox] = {}
        # Their records go to the store together (one write for those answered meanwhile).
        self.records = RecordBatcher(store)
        self._persisting: set[asyncio.Task[Sandbox]] = set()
        # With replicas (Kubernetes): the watch cache read before placement; None: the store.
        self.cache: ReadCache | None = None
        # Fast mode: store the record only once the answer has left (`CreateOptions.replied`),
        # where the store's write costs enough to hold the reply back (Kubernetes: two
        # apiserver round trips, their TLS and JSON, on the cores the reply needs).
        self.store_after_reply = False

    # -- index -----------------------------------------------------------------------------
    async def load(self) -> list[Sandbox]:
        """Read every record (recovery) and rebuild the idempotency index from annotations."""
        sandboxes = await self.store.list(Sandbox)
        for sb in sandboxes:
            self.remember(sb)
        return sandboxes

    def remember(self, sb: Sandbox) -> None:
        if sb.status.container_id:
            self.keys[sb.status.container_id] = (sb.metadata.namespace, sb.metadata.name)
        key = sb.metadata.annotations.get(IDEMPOTENCY_KEY)
        if key:
            self._idempotency[(sb.metadata.namespace, key)] = (
                sb.metadata.name,
                sb.metadata.annotations.get(SPEC_HASH, ""),
            )

    def _forget(self, sb: Sandbox) -> None:
        self.keys.pop(sb.status.container_id, None)
        key = sb.metadata.annotations.get(IDEMPOTENCY_KEY)
        if key:
            self._idempotency.pop((sb.metadata.namespace, key), None)

    # -- create ----------------------------------------------------------------------------
    async def create(self, sb: Sandbox, opts: CreateOptions) -> Sandbox:
        # The caller's registry credentials reach the agent call of this create (and its task)
        # only: never the record, so a later start (AutoRecreate, reset) goes without them.
        _PULL_CREDENTIALS.set(opts.pull_credentials)
        if opts.mode is ConsistencyMode.STRONG:
            return await self._create_locked(sb, opts, None)
        # Fast: the serial section runs on in its own task past the answer (the record write);
        # the caller gets the sandbox as soon as the agent reports it started.
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[Sandbox] = loop.create_future()
        task = loop.create_task(
            self._create_locked(sb, opts, answered), name=f"create {sb.metadata.name}"
        )
        self._persisting.add(task)
        task.add_done_callback(self._persist_done)
        try:
            await asyncio.wait({answered, task}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if not answered.done():
                task.cancel()  # not acknowledged: the create is taken back (`_run_on_agent`)
            raise
        if answered.done():
            return answered.result()
        return task.result()

    def _persist_done(self, task: asyncio.Task[Sandbox]) -> None:
        self._persisting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("create failed", extra={"task": task.get_name()})

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for acknowledged Fast creates to be stored: a clean stop leaves no
        work to recovery."""
        if self._persisting:
            await asyncio.wait(set(self._persisting), timeout=timeout)

    async def get(self, namespace: str, name: str) -> Sandbox:
        """The record, including a Fast create answered and not stored yet."""
        pending = self.unstored.get((namespace, name))
        if pending is not None:
            return pending.model_copy(deep=True)
        return await self.store.get(Sandbox, namespace, name)

    async def list(
        self, namespace: str | None = None, label_selector: dict[str, str] | None = None
    ) -> list[Sandbox]:
        items = await self.store.list(Sandbox, namespace, label_selector)
        if self.unstored:
            seen = {(s.metadata.namespace, s.metadata.name) for s in items}
            for key, sb in list(self.unstored.items()):
                labels_ = sb.metadata.labels
                if key in seen or (namespace and key[0] != namespace):
                    continue
                if label_selector and any(labels_.get(k) != v for k, v in label_selector.items()):
                    continue
                items.append(sb.model_copy(deep=True))
        return items

    async def _create_locked(
        self, sb: Sandbox, opts: CreateOptions, answered: asyncio.Future[Sandbox] | None
    ) -> Sandbox:
        ns, name = sb.metadata.namespace, sb.metadata.name
        if opts.idempotency_key:
            existing = await self._replay(ns, opts)
            if existing is not None:
                return existing
        async with self.locks.hold((ns, name)):
            if opts.idempotency_key:
                # A concurrent twin may have finished while we waited for the lock.
                existing = await self._replay(ns, opts)
                if existing is not None:
                    return existing
            pool = await self._check_new(sb)
            sb.metadata.uid = sb.metadata.uid or str(uuid.uuid4())
            sb.metadata.finalizers = [CLEANUP_FINALIZER]
            sb.metadata.annotations[MODE] = opts.mode.value
            if opts.idempotency_key:
                sb.metadata.annotations[IDEMPOTENCY_KEY] = opts.idempotency_key
                sb.metadata.annotations[SPEC_HASH] = opts.request_hash
            timings = Timings(accepted_ms=_ms(opts.arrived))
            if sb.spec.lease_seconds:
                # Persisted with the record, so a restarted control plane re-arms the lease.
                sb.status.lease_expire_time = now() + timedelta(seconds=sb.spec.lease_seconds)
            until = time.monotonic() + self.scale_wait_seconds
            if opts.deadline is not None:
                until = min(until, opts.deadline)
            if answered is None:
                sb.status.phase = SandboxPhase.PENDING
                sb.status.timings = timings
                stored = await self.store.create(sb)
                try:
                    stored = await self._start(stored, opts.arrived, timings, until=until)
                except BaseException:
                    await self._discard_record(stored)
                    raise
            else:
                stored = await self._start_fast(sb, opts, timings, until, pool, answered)
            self.remember(stored)
            return stored

    async def _replay(self, ns: str, opts: CreateOptions) -> Sandbox | None:
        hit = self._idempotency.get((ns, opts.idempotency_key))
        if hit is None:
            return None
        name, digest = hit
        if digest != opts.request_hash:
            raise AlreadyExists(
                f"idempotency key {opts.idempotency_key!r} was used for a different request "
                f"(sandbox {ns}/{name}); use a new key"
            )
        try:
            return await self.get(ns, name)
        except NotFound:
            self._idempotency.pop((ns, opts.idempotency_key), None)
            return None

    async def _check_new(self, sb: Sandbox) -> SandboxPool:
        """The name is free and the pool exists (its record returned). With a watch cache
        (`self.cache`, Kubernetes) both are read from it instead of two apiserver round trips;
        a name taken meanwhile by another replica is caught by the record write."""
        ns, name = sb.metadata.namespace, sb.metadata.name
        taken = None if self.cache is None else self.cache.name_taken(ns, name)
        if taken is not False:
            try:
                await self.store.get(Sandbox, ns, name)
            except NotFound:
                pass
            else:
                raise AlreadyExists(
                    f"sandbox {ns}/{name} already exists; delete it first or choose another name"
                )
        cached = None if self.cache is None else self.cache.pool(ns, sb.spec.pool_ref)
        if cached is not None:
            return cached
        try:
            return await self.store.get(SandboxPool, ns, sb.spec.pool_ref)
        except NotFound:
            raise NotFound(
                f"pool {ns}/{sb.spec.pool_ref} not found; create it with `fsb pool create` "
                "or pass --pool"
            ) from None

    async def _start_fast(
        self,
        sb: Sandbox,
        opts: CreateOptions,
        timings: Timings,
        until: float,
        pool: SandboxPool,
        answered: asyncio.Future[Sandbox],
    ) -> Sandbox:
        arrived = opts.arrived
        # Built once: the label the container carries is also what says whether it fits.
        label = request_label(sb)
        allocation, state = await self._place(
            sb, arrived, timings, until=until, pool_record=pool, label=label
        )
        timings.runtime_ready_ms = _ms(arrived)
        self.mark_running(sb, allocation, state, timings)
        sb.metadata.creation_timestamp = sb.metadata.creation_timestamp or now()
        key = (sb.metadata.namespace, sb.metadata.name)
        if not label:
            # Too big to ride on the container (containerd's 4 KiB label limit): nothing would
            # rebuild it after a crash, so this one is stored before it is answered.
            stored = await self._persist(sb, allocation)
            answered.set_result(stored.model_copy(deep=True))
            self._record_started(stored)
            return stored
        self.unstored[key] = sb
        self.remember(sb)
        answer = sb.model_copy(deep=True)
        if not self.store.keeps_uid:
            # The apiserver assigns the uid when the record is written, just after this answer:
            # promising ours would show a uid that never exists. `fsb get` shows the real one.
            answer.metadata.uid = ""
        answered.set_result(answer)
        try:
            if opts.replied is not None and self.store_after_reply:
                # Bounded: a reply stuck on a slow client must not hold the record back. The
                # container's request label covers a crash meanwhile, as it covers the write.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(opts.replied), REPLY_WAIT_SECONDS)
            stored = await self._persist(sb, allocation)
        finally:
            self.unstored.pop(key, None)
        self._record_started(stored)
        return stored

    async def _persist(self, sb: Sandbox, allocation: Allocation) -> Sandbox:
        """Store an acknowledged create, retrying while the store is unavailable (the answer
        is given: giving up would lose a sandbox the caller holds). Only a name taken by another
        writer (another replica, kubectl) in between makes the container an orphan: it is
        removed, as nobody can reach it by that name."""
        delay = 0.05
        while True:
            try:
                stored = await self.records.create(sb)
                break
            except AlreadyExists:
                current = await self.store.get(Sandbox, sb.metadata.namespace, sb.metadata.name)
                same_container = bool(sb.status.container_id) and (
                    current.status.container_id == sb.status.container_id
                )
                if current.metadata.uid == sb.metadata.uid or same_container:
                    # Rebuilt from the container's label by a recovery (on Kubernetes with the
                    # apiserver's own uid, so the container tells it is this sandbox).
                    stored = current
                    break
                log.error(
                    "name taken by another writer after the create was answered; removing it",
                    extra={"sandbox": sb.metadata.name, "sandbox_id": allocation.sandbox_id},
                )
                await self._remove_container(allocation)
                raise
            except (Unavailable, Conflict) as exc:
                log.warning("persist retry", extra={"sandbox": sb.metadata.name, "err": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except FsbError:
                await self._remove_container(allocation)
                raise
        if stored.status.phase is sb.status.phase:
            return stored
        # The store keeps no status on create (Kubernetes: the status subresource owns it).
        delay = 0.05
        while True:
            stored.status = sb.status.model_copy(deep=True)
            try:
                return await self.store.update_status(stored)
            except Conflict:
                stored = await self.store.get(Sandbox, sb.metadata.namespace, sb.metadata.name)
            except Unavailable as exc:
                log.warning("status retry", extra={"sandbox": sb.metadata.name, "err": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _start(
        self, stored: Sandbox, arrived: float, timings: Timings, *, until: float | None = None
    ) -> Sandbox:
        """Place and start a sandbox whose record already exists (Strong mode, declarative).
        With `until`, a full pool that may still grow is waited for (a create's caller); the
        reconciler passes none: its records wait as Unschedulable instead."""
        allocation, state = await self._place(stored, arrived, timings, until=until)
        timings.runtime_ready_ms = _ms(arrived)
        self.mark_running(stored, allocation, state, timings)
        try:
            running = await self.store.update_status(stored)
        except BaseException:
            await self._remove_container(allocation)
            raise
        self._record_started(running)
        return running

    def _record_started(self, sb: Sandbox) -> None:
        """Scheduled and Started, once the record says so (events of unstored objects are
        dropped)."""
        status, timings = sb.status, sb.status.timings or Timings()
        where = status.assigned_agent + (f" ({status.agent_ip})" if status.agent_ip else "")
        self.events.record(
            sb, "Scheduled", f"assigned to agent {where}{_after(timings.scheduled_ms)}"
        )
        self.events.record(
            sb,
            "Started",
            f"container {status.container_id} running{_after(timings.runtime_ready_ms)}",
        )

    async def _place(
        self,
        sb: Sandbox,
        arrived: float,
        timings: Timings,
        *,
        until: float | None = None,
        pool_record: SandboxPool | None = None,
        label: Sequence[agent_pb2.KeyValue] | None = None,
    ) -> tuple[Allocation, agent_pb2.SandboxState]:
        """Take a slot and start the container there. An agent that refuses for capacity is
        skipped for the next candidate: its own count is the truth, and ours lags behind creates
        made meanwhile by other control-plane replicas (Kubernetes) or unknown orphans. When no
        candidate is left, the pool is waited for (with `until`, while it may grow), and
        otherwise the last refusal is the answer (RESOURCE_EXHAUSTED)."""
        ns, pool = sb.metadata.namespace, sb.spec.pool_ref
        refused: set[str] = set()
        last: CapacityExhausted | None = None
        refreshed = self.refresh_agents is None
        # Before a slot is taken: a limit above the pool's maximum, or an image from a registry
        # we do not pull from, is refused with nothing made.
        if self.allowed_registries is not None:
            check_registry(sb.spec.image, self.allowed_registries, "spec.image")
        if pool_record is None:
            with contextlib.suppress(NotFound):
                pool_record = await self.store.get(SandboxPool, ns, sb.spec.pool_ref)
        limits = await self.limits(sb, pool_record)
        # Private sandboxes publish their ports each on a host port of its own.
        exclusive = pool_record is None or pool_record.spec.network_mode is NetworkMode.SHARED
        waited_from: float | None = None
        while True:
            try:
                allocation = self._allocate(sb, exclude=refused, exclusive_ports=exclusive)
            except CapacityExhausted as exc:
                if not refreshed:
                    refreshed = True
                    assert self.refresh_agents is not None
                    if await self.refresh_agents(ns, pool):
                        continue
                answer = last or exc
                if until is None or self.wait_for_room is None:
                    raise answer from None
                if waited_from is None:
                    waited_from = time.perf_counter()
                    log.info(
                        "pool has no free slot; waiting for it to grow",
                        extra={"sandbox": f"{ns}/{sb.metadata.name}", "pool": pool},
                    )
                await self.wait_for_room(ns, pool, sb.metadata.name, until, answer.message)
                # Room may have come anywhere: agents that refused are asked again, and with
                # replicas the fleet is listed again (at most every REFRESH_SPACING).
                refused.clear()
                last = None
                refreshed = self.refresh_agents is None
                continue
            timings.scheduled_ms = _ms(arrived)
            if waited_from is not None:
                timings.scaled_ms = _ms(waited_from)
            try:
                state = await self._run_on_agent(sb, allocation, limits, label)
                if state.pulled_ms:
                    timings.pulled_ms = round(state.pulled_ms, 3)
                if state.warm:
                    timings.warm = True
                return allocation, state
            except CapacityExhausted as exc:
                self.registry.release(allocation.agent, allocation.sandbox_id)
                refused.add(allocation.agent)
                last = exc
                log.info(
                    "agent refused for capacity; trying the next one",
                    extra={"sandbox": sb.metadata.name, "agent": allocation.agent},
                )
            except BaseException:
                self.registry.release(allocation.agent, allocation.sandbox_id)
                raise

    def _allocate(
        self, sb: Sandbox, exclude: set[str] | None = None, *, exclusive_ports: bool = True
    ) -> Allocation:
        return self.registry.allocate(
            namespace=sb.metadata.namespace,
            pool=sb.spec.pool_ref,
            image=sb.spec.image,
            ports=sb.spec.exposed_ports,
            sandbox_id=new_sandbox_id(sb.metadata.name),
            exclude=exclude,
            exclusive_ports=exclusive_ports,
        )

    async def limits(self, sb: Sandbox, pool: SandboxPool | None = None) -> Limits:
        """The sandbox's limits from its spec, its pool's defaults and maximum, and ours."""
        if pool is None:
            try:
                pool = await self.store.get(SandboxPool, sb.metadata.namespace, sb.spec.pool_ref)
            except NotFound:
                pool = None  # placement says so, naming the pool
        return effective_limits(
            sb.spec.resources,
            pool.spec if pool is not None else None,
            server_defaults(self.default_cpu, self.default_memory, self.default_disk),
        )

    def runtime_spec(
        self,
        sb: Sandbox,
        sandbox_id: str,
        limits: Limits | None = None,
        label: Sequence[agent_pb2.KeyValue] | None = None,
    ) -> agent_pb2.SandboxRuntimeSpec:
        """What the agent gets; `label`: `request_label(sb)` when the caller has built it."""
        spec = sb.spec
        creds = _PULL_CREDENTIALS.get()
        if limits is None:
            fallback = server_defaults(self.default_cpu, self.default_memory, self.default_disk)
            limits = effective_limits(spec.resources, None, fallback)
        return agent_pb2.SandboxRuntimeSpec(
            sandbox_id=sandbox_id,
            namespace=sb.metadata.namespace,
            name=sb.metadata.name,
            image=spec.image,
            command=spec.command,
            args=spec.args,
            env=[agent_pb2.KeyValue(key=e.name, value=e.value) for e in spec.env],
            working_dir=spec.working_dir,
            exposed_ports=spec.exposed_ports,
            labels=[
                agent_pb2.KeyValue(key=labels.UID_LABEL, value=sb.metadata.uid),
                agent_pb2.KeyValue(key=labels.POOL_LABEL, value=spec.pool_ref),
                *(request_label(sb) if label is None else label),
            ],
            cpu_millis=limits.cpu_millis,
            memory_bytes=limits.memory_bytes,
            pids_limit=limits.pids,
            disk_bytes=limits.disk_bytes,
            log_max_bytes=limits.log_max_bytes,
            pull_username=creds.username if creds else "",
            pull_password=creds.password if creds else "",
        )

    async def _run_on_agent(
        self,
        sb: Sandbox,
        allocation: Allocation,
        limits: Limits | None = None,
        label: Sequence[agent_pb2.KeyValue] | None = None,
    ) -> agent_pb2.SandboxState:
        client = self.agents.get(allocation.target)
        try:
            spec = self.runtime_spec(sb, allocation.sandbox_id, limits, label)
            return await client.create(spec)
        except CapacityExhausted:
            # The agent is the capacity authority; our view was stale (e.g. an unknown orphan).
            raise
        except Unavailable:
            # It may have started the container before the connection broke.
            await self._remove_container(allocation)
            raise
        except asyncio.CancelledError:
            # Our caller went away (its client hung up): the agent finishes a create whatever
            # happens to the call, so the container is taken back here, as nobody will record it.
            await asyncio.shield(self._remove_container(allocation))
            raise

    def mark_running(
        self,
        sb: Sandbox,
        allocation: Allocation,
        state: agent_pb2.SandboxState,
        timings: Timings,
    ) -> None:
        status = sb.status
        transition(status, SandboxPhase.RUNNING)
        status.assigned_agent = allocation.agent
        status.agent_ip = allocation.ip
        # A private sandbox's ports are published on host ports its agent chose (the label);
        # a shared one's are the declared ports on the agent's address.
        published = next((kv.value for kv in state.labels if kv.key == labels.PUBLISHED_LABEL), "")
        status.endpoints = (
            labels.published_endpoints(allocation.ip, published)
            if published
            else allocation.endpoints
        )
        status.container_id = state.container_id or allocation.sandbox_id
        status.started_at = now()
        status.exit_code = None
        status.timings = timings
        status.message = ""
        status.observed_reset_revision = sb.spec.reset_revision
        status.conditions = [c for c in status.conditions if c.type not in _RESET_ON_START]
        set_condition(status, "Ready", True, reason="Started")
        # The agent has just answered: the reconciler's first pass over this record then finds
        # nothing to write (one store write, watch event and pass fewer per create).
        set_condition(status, "AgentReachable", True, reason="Started")
        self.keys[status.container_id] = (sb.metadata.namespace, sb.metadata.name)

    async def _remove_container(self, allocation: Allocation) -> None:
        try:
            await self.agents.get(allocation.target).delete(allocation.sandbox_id, 0)
        except FsbError:
            log.exception(
                "could not remove container after a failed create",
                extra={"sandbox_id": allocation.sandbox_id, "agent": allocation.agent},
            )
            return  # keep the slot: the container may still exist
        self.registry.release(allocation.agent, allocation.sandbox_id)

    async def _discard_record(self, sb: Sandbox) -> None:
        """Remove a Strong-mode record whose sandbox could not be started."""
        try:
            current = await self.store.get(Sandbox, sb.metadata.namespace, sb.metadata.name)
            current.metadata.finalizers = []
            await self.store.update(current)
            await self.store.delete(Sandbox, sb.metadata.namespace, sb.metadata.name)
        except NotFound:
            pass

    # -- reads -----------------------------------------------------------------------------
    async def logs(
        self, namespace: str, name: str, *, follow: bool, tail_lines: int, since_unix: float = 0.0
    ) -> AsyncIterator[agent_pb2.LogData]:
        """The sandbox's output from its agent, chunk by chunk (stdout and stderr apart)."""
        if tail_lines < 0:
            raise InvalidArgument(f"tail_lines {tail_lines}: must be 0 (all) or positive")
        if since_unix < 0:
            raise InvalidArgument(f"since_unix {since_unix}: must be 0 (all) or a unix time")
        sb = await self.get(namespace, name)
        agent = (
            self.registry.get_agent(sb.status.assigned_agent) if sb.status.assigned_agent else None
        )
        if agent is None or not sb.status.container_id:
            raise NotFound(
                f"sandbox {namespace}/{name} has no container (phase {sb.status.phase.value})"
            )
        client = self.agents.get(agent.target)
        async for chunk in client.logs(
            sb.status.container_id, follow=follow, tail_lines=tail_lines, since_unix=since_unix
        ):
            yield chunk
