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

`SandboxService` is this module (the index, create in both modes, reads) with two halves beside
it: placing and starting a container (`sandbox_start.py`) and deleting (`sandbox_delete.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

from fastsandbox._aio.keyed import KeyedLocks
from fastsandbox.api import labels
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
from fastsandbox.api.labels import CLEANUP_FINALIZER
from fastsandbox.api.models import (
    ConsistencyMode,
    Sandbox,
    SandboxPhase,
    SandboxPool,
    Timings,
    now,
)
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.create_request import (
    CreateOptions,
    ReadCache,
    request_label,
)
from fastsandbox.control.events import EventRecorder
from fastsandbox.control.record_batch import RecordBatcher
from fastsandbox.control.registry import Allocation, Registry
from fastsandbox.control.sandbox_delete import SandboxDeletion
from fastsandbox.control.sandbox_start import PULL_CREDENTIALS, SandboxStart, ms_since
from fastsandbox.errors import (
    AlreadyExists,
    Conflict,
    FsbError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from fastsandbox.settings import DEFAULT_SANDBOX_DISK
from fastsandbox.store.base import ObjectStore

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY = labels.IDEMPOTENCY_KEY_ANNOTATION
SPEC_HASH = labels.SPEC_HASH_ANNOTATION
MODE = labels.MODE_ANNOTATION

Key = tuple[str, str]

# How long a Fast create's record waits for its answer to leave before it is stored anyway.
REPLY_WAIT_SECONDS = 0.05


class SandboxService(SandboxStart, SandboxDeletion):
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
        PULL_CREDENTIALS.set(opts.pull_credentials)
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
            timings = Timings(accepted_ms=ms_since(opts.arrived))
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
        timings.runtime_ready_ms = ms_since(arrived)
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
