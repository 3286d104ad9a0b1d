"""Sandbox lifecycle operations shared by the Fast-Path and the reconciler.

Every operation on one sandbox runs inside that sandbox's serial section (`KeyedLocks`), so a
Fast-Path create, a user's delete and the reconciler never interleave on the same object, while
different sandboxes proceed in parallel.

- Fast mode: allocate a slot, start the container on the agent, then write the record (already
  Running). One store write; the record is written before the reply so a `get` right after `run`
  always finds it.
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
import hashlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from fastsandbox._aio.keyed import KeyedLocks
from fastsandbox.api import labels
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
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
from fastsandbox.control.events import EventRecorder
from fastsandbox.control.limits import Limits, effective_limits, server_defaults
from fastsandbox.control.registry import Allocation, Registry
from fastsandbox.errors import (
    AlreadyExists,
    CapacityExhausted,
    Conflict,
    FsbError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from fastsandbox.store.base import ObjectStore

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY = labels.IDEMPOTENCY_KEY_ANNOTATION
SPEC_HASH = labels.SPEC_HASH_ANNOTATION
MODE = labels.MODE_ANNOTATION

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class CreateOptions:
    mode: ConsistencyMode = ConsistencyMode.FAST
    idempotency_key: str = ""
    # Hash of the request as the user sent it (ttl, not the expire time derived from it), so a
    # retried request matches its first attempt.
    request_hash: str = ""
    # time.perf_counter() when the request arrived; timings are measured from here.
    arrived: float = 0.0
    # time.monotonic() the caller stops waiting at (its gRPC deadline); None: no deadline.
    deadline: float | None = None


def request_hash(canonical_json: str) -> str:
    return hashlib.sha256(canonical_json.encode()).hexdigest()[:32]


# Conditions that describe the previous container; a new one starts without them.
_RESET_ON_START = frozenset({"Ready", "Scheduled", "AgentReachable"})


def new_sandbox_id(name: str) -> str:
    return f"{name[:50]}-{secrets.token_hex(4)}"


REQUEST_LABEL = labels.REQUEST_LABEL
# containerd refuses labels over 4096 bytes (key + value).
_MAX_LABEL = 4096 - len(REQUEST_LABEL)


def request_label(sb: Sandbox) -> list[agent_pb2.KeyValue]:
    """The record, without status, carried on the container as a label: if the server dies
    between the agent's create and the record's write (Fast mode), recovery rebuilds the record
    from it instead of leaving a running sandbox nobody knows about."""
    body = json.dumps(
        {
            "metadata": sb.metadata.model_dump(mode="json", by_alias=True, exclude_none=True),
            "spec": sb.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        },
        separators=(",", ":"),
    )
    if len(body) > _MAX_LABEL:
        return []
    return [agent_pb2.KeyValue(key=REQUEST_LABEL, value=body)]


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


def _after(ms: float | None) -> str:
    return f" after {ms:.1f} ms" if ms else ""


def _deleting(sb: Sandbox, grace: float) -> str:
    status = sb.status
    if not (status.assigned_agent and status.container_id):
        return "deletion requested; no container to stop"
    return (
        f"deletion requested; stopping container {status.container_id} on agent "
        f"{status.assigned_agent} (grace {grace:g}s)"
    )


class SandboxService:
    def __init__(
        self,
        store: ObjectStore,
        registry: Registry,
        agents: AgentClients,
        *,
        grace_seconds: float,
        default_cpu: str,
        default_memory: str,
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
            await self._check_new(sb)
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
            if opts.mode is ConsistencyMode.STRONG:
                sb.status.phase = SandboxPhase.PENDING
                sb.status.timings = timings
                stored = await self.store.create(sb)
                try:
                    stored = await self._start(stored, opts.arrived, timings, until=until)
                except BaseException:
                    await self._discard_record(stored)
                    raise
            else:
                stored = await self._start_fast(sb, opts.arrived, timings, until)
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
            return await self.store.get(Sandbox, ns, name)
        except NotFound:
            self._idempotency.pop((ns, opts.idempotency_key), None)
            return None

    async def _check_new(self, sb: Sandbox) -> None:
        ns, name = sb.metadata.namespace, sb.metadata.name
        try:
            await self.store.get(Sandbox, ns, name)
        except NotFound:
            pass
        else:
            raise AlreadyExists(
                f"sandbox {ns}/{name} already exists; delete it first or choose another name"
            )
        try:
            await self.store.get(SandboxPool, ns, sb.spec.pool_ref)
        except NotFound:
            raise NotFound(
                f"pool {ns}/{sb.spec.pool_ref} not found; create it with `fsb pool create` "
                "or pass --pool"
            ) from None

    async def _start_fast(
        self, sb: Sandbox, arrived: float, timings: Timings, until: float
    ) -> Sandbox:
        allocation, state = await self._place(sb, arrived, timings, until=until)
        timings.runtime_ready_ms = _ms(arrived)
        self.mark_running(sb, allocation, state, timings)
        try:
            stored = await self._persist(sb)
        except BaseException:
            # The record could not be written: do not leave a container nobody knows about.
            await self._remove_container(allocation)
            raise
        self._record_started(stored)
        return stored

    async def _persist(self, sb: Sandbox) -> Sandbox:
        delay = 0.05
        for _attempt in range(5):
            try:
                stored = await self.store.create(sb)
                break
            except (Unavailable, Conflict) as exc:
                log.warning("persist retry", extra={"sandbox": sb.metadata.name, "err": str(exc)})
                await asyncio.sleep(delay)
                delay *= 2
        else:
            stored = await self.store.create(sb)
        if stored.status.phase is sb.status.phase:
            return stored
        # The store keeps no status on create (Kubernetes: the status subresource owns it):
        # write it now; failing that, take the record back, so nothing is left half-made.
        stored.status = sb.status.model_copy(deep=True)
        try:
            return await self.store.update_status(stored)
        except BaseException:
            await asyncio.shield(self._discard_record(stored))
            raise

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
        self, sb: Sandbox, arrived: float, timings: Timings, *, until: float | None = None
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
        # Before a slot is taken: a limit above the pool's maximum is refused with nothing made.
        pool_obj = await self._pool(sb)
        limits = self._limits(sb, pool_obj)
        exclusive = pool_obj is None or pool_obj.spec.network_mode is NetworkMode.SHARED
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
                state = await self._run_on_agent(sb, allocation, limits)
                if state.pulled_ms:
                    timings.pulled_ms = round(state.pulled_ms, 3)
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

    async def limits(self, sb: Sandbox) -> Limits:
        """The sandbox's limits from its spec, its pool's defaults and maximum, and ours."""
        return self._limits(sb, await self._pool(sb))

    async def _pool(self, sb: Sandbox) -> SandboxPool | None:
        try:
            return await self.store.get(SandboxPool, sb.metadata.namespace, sb.spec.pool_ref)
        except NotFound:
            return None  # placement says so, naming the pool

    def _limits(self, sb: Sandbox, pool: SandboxPool | None) -> Limits:
        return effective_limits(
            sb.spec.resources,
            pool.spec if pool is not None else None,
            server_defaults(self.default_cpu, self.default_memory),
        )

    def runtime_spec(
        self, sb: Sandbox, sandbox_id: str, limits: Limits | None = None
    ) -> agent_pb2.SandboxRuntimeSpec:
        spec = sb.spec
        if limits is None:
            fallback = server_defaults(self.default_cpu, self.default_memory)
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
                *request_label(sb),
            ],
            cpu_millis=limits.cpu_millis,
            memory_bytes=limits.memory_bytes,
            pids_limit=limits.pids,
            disk_bytes=limits.disk_bytes,
            log_max_bytes=limits.log_max_bytes,
        )

    async def _run_on_agent(
        self, sb: Sandbox, allocation: Allocation, limits: Limits | None = None
    ) -> agent_pb2.SandboxState:
        client = self.agents.get(allocation.target)
        try:
            return await client.create(self.runtime_spec(sb, allocation.sandbox_id, limits))
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

    # -- delete ----------------------------------------------------------------------------
    async def delete(self, namespace: str, name: str, *, wait: bool) -> Sandbox | None:
        async with self.locks.hold((namespace, name)):
            sb = await self.store.get(Sandbox, namespace, name)
            if sb.metadata.deletion_timestamp is None:
                marked = await self.store.delete(Sandbox, namespace, name)
                if marked is None:
                    self._forget(sb)
                    return None
                sb = marked
            if sb.status.phase is not SandboxPhase.TERMINATING:
                transition(sb.status, SandboxPhase.TERMINATING)
                sb = await self.store.update_status(sb)
                self.events.record(sb, "Deleting", _deleting(sb, self.grace_seconds))
            if not wait and sb.status.assigned_agent:
                return sb
            if await self.finalize(sb) is not None:
                return sb  # the agent cannot confirm yet; the reconciler finishes it
            return None

    def unreachable_for(self, agent_name: str) -> float | None:
        """Seconds the agent has not answered (None while it answers). An agent the registry
        does not know at all counts from when this control plane started."""
        agent = self.registry.get_agent(agent_name)
        if agent is not None and agent.ready:
            return None
        since = agent.unready_since if agent is not None else None
        return time.monotonic() - (since if since is not None else self.started_at)

    async def finalize(self, sb: Sandbox) -> float | None:
        """Remove the container, then the slot, then the finalizer, in that order. Returns the
        seconds to wait before trying again while the agent cannot confirm; an agent gone for
        longer than the sandbox's recovery timeout is given up on (its container, should it
        come back, has no record any more and is the janitor's)."""
        agent_name, sandbox_id = sb.status.assigned_agent, sb.status.container_id
        if agent_name and sandbox_id:
            gone_for = self.unreachable_for(agent_name)
            if gone_for is None:
                agent = self.registry.agent(agent_name)
                try:
                    await self.agents.get(agent.target).delete(sandbox_id, self.grace_seconds)
                except FsbError as exc:
                    self.events.warning(sb, "DeleteFailed", f"{exc.message}; retrying")
                    raise
            elif gone_for < sb.spec.recovery_timeout_seconds:
                self.events.warning(
                    sb,
                    "DeletePending",
                    f"agent {agent_name} does not answer: the record stays until it confirms "
                    f"the container is gone, or for recoveryTimeoutSeconds "
                    f"({sb.spec.recovery_timeout_seconds}s)",
                )
                return sb.spec.recovery_timeout_seconds - gone_for
            else:
                log.warning(
                    "agent gone; released without its confirmation",
                    extra={
                        "sandbox": f"{sb.metadata.namespace}/{sb.metadata.name}",
                        "agent": agent_name,
                    },
                )
            self.registry.release(agent_name, sandbox_id)
        if CLEANUP_FINALIZER in sb.metadata.finalizers:
            sb.metadata.finalizers = [f for f in sb.metadata.finalizers if f != CLEANUP_FINALIZER]
            with contextlib.suppress(NotFound):
                try:
                    await self.store.update(sb)
                except Conflict:
                    # Written meanwhile (on Kubernetes, another replica may be finalizing it
                    # too): the container is gone either way; take the finalizer off what is
                    # there now, if it is still on (and still this object, not a new one).
                    current = await self.store.get(Sandbox, sb.metadata.namespace, sb.metadata.name)
                    same = current.metadata.uid == sb.metadata.uid
                    if same and CLEANUP_FINALIZER in current.metadata.finalizers:
                        current.metadata.finalizers.remove(CLEANUP_FINALIZER)
                        await self.store.update(current)
        self._forget(sb)
        return None

    # -- reads -----------------------------------------------------------------------------
    async def logs(
        self, namespace: str, name: str, *, follow: bool, tail_lines: int, since_unix: float = 0.0
    ) -> AsyncIterator[agent_pb2.LogData]:
        """The sandbox's output from its agent, chunk by chunk (stdout and stderr apart)."""
        if tail_lines < 0:
            raise InvalidArgument(f"tail_lines {tail_lines}: must be 0 (all) or positive")
        if since_unix < 0:
            raise InvalidArgument(f"since_unix {since_unix}: must be 0 (all) or a unix time")
        sb = await self.store.get(Sandbox, namespace, name)
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
