"""The Fast-Path gRPC service: the edge where requests are validated and errors become statuses.

Requests are turned into pydantic models here (so a bad field is INVALID_ARGUMENT naming the
field, before anything is allocated), handed to `SandboxService` / `PoolManager`, and every
`FsbError` is mapped to its gRPC status in exactly one place (`_guard`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict
from pydantic import ValidationError

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc
from fastsandbox.api.images import PullCredentials
from fastsandbox.api.labels import API_VERSION
from fastsandbox.api.models import (
    KINDS,
    ConsistencyMode,
    Event,
    ObjectMeta,
    Sandbox,
    SandboxPool,
    SandboxSpec,
    describe_validation_error,
    now,
    parse_rfc3339,
    to_wire,
)
from fastsandbox.control.create_request import CreateOptions, request_hash
from fastsandbox.control.fastpath import lease
from fastsandbox.control.fastpath.access import current_caller
from fastsandbox.control.fastpath.authz import Action
from fastsandbox.control.fastpath.io_relay import IoRelayRpcs
from fastsandbox.control.fastpath.request_limits import check_labels, check_sandbox
from fastsandbox.control.fastpath.token_rpcs import TokenRpcs
from fastsandbox.control.pools import PoolManager
from fastsandbox.control.sandboxes import SandboxService
from fastsandbox.control.updates import SandboxUpdates, patch_from_request
from fastsandbox.errors import CapacityExhausted, FsbError, InvalidArgument
from fastsandbox.metrics import Metrics
from fastsandbox.store.base import DEFAULT_EVENT_LIMIT, ObjectStore

log = logging.getLogger(__name__)

T = TypeVar("T")


def _json(obj: Sandbox | SandboxPool) -> str:
    return json.dumps(to_wire(obj), separators=(",", ":"))


def _validated(build: Callable[[], T], prefix: str = "") -> T:
    try:
        return build()
    except ValidationError as exc:
        raise InvalidArgument(describe_validation_error(exc, prefix)) from None
    except ValueError as exc:
        raise InvalidArgument(f"{prefix}: {exc}" if prefix else str(exc)) from None


def sandbox_from_request(req: fastpath_pb2.CreateRequest) -> Sandbox:
    if req.expire_time and req.ttl_seconds:
        raise InvalidArgument("give either ttl_seconds or expire_time, not both")
    if req.ttl_seconds < 0:
        raise InvalidArgument("spec.ttlSeconds: must be positive")
    spec: dict[str, Any] = {
        "image": req.image,
        "poolRef": req.pool_ref,
        "command": list(req.command),
        "args": list(req.args),
        "env": [{"name": e.name, "value": e.value} for e in req.env],
        "workingDir": req.working_dir,
        "exposedPorts": list(req.exposed_ports),
        "resetRevision": req.reset_revision,
    }
    if req.failure_policy:
        spec["failurePolicy"] = req.failure_policy
    if req.recovery_timeout_seconds:
        spec["recoveryTimeoutSeconds"] = req.recovery_timeout_seconds
    if req.HasField("resources"):
        res = req.resources
        # Empty/0 is "unset" in proto3: the pool's default. A negative count is refused (the
        # model's minimum), never read as unset.
        given = (("cpu", res.cpu), ("memory", res.memory), ("pids", res.pids), ("disk", res.disk))
        spec["resources"] = {k: v for k, v in given if v}
    if req.lease_seconds < 0:
        raise InvalidArgument("spec.leaseSeconds: must be positive")
    if req.lease_seconds:
        spec["leaseSeconds"] = req.lease_seconds
    if req.ttl_seconds:
        try:
            spec["expireTime"] = now() + timedelta(seconds=req.ttl_seconds)
        except OverflowError:  # past year 9999 (found by tests/fuzz)
            raise InvalidArgument("spec.ttlSeconds: too large") from None
    elif req.expire_time:
        spec["expireTime"] = _validated(lambda: parse_rfc3339(req.expire_time), "spec.expireTime")
    meta = _validated(
        lambda: ObjectMeta(
            name=req.name, namespace=req.namespace or "default", labels=dict(req.labels)
        ),
        "metadata",
    )
    parsed = _validated(lambda: SandboxSpec.model_validate(spec), "spec")
    sb = Sandbox(metadata=meta, spec=parsed)
    check_sandbox(sb)
    return sb


def _pull_credentials(req: fastpath_pb2.CreateRequest) -> PullCredentials | None:
    if not req.HasField("pull_credentials"):
        return None
    given = req.pull_credentials
    return PullCredentials(given.username, given.password)


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """time.monotonic() a little before the caller's gRPC deadline (None without one), so a
    create waiting for its pool answers RESOURCE_EXHAUSTED instead of DEADLINE_EXCEEDED."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + max(remaining - 0.5, 0.0)


def _finished(context: grpc.aio.ServicerContext[Any, Any]) -> asyncio.Future[None] | None:
    """Done once the RPC has finished, its answer sent (or it failed or was cancelled): what a
    Fast create waits for before it stores the record. None when the context cannot say."""
    add = getattr(context, "add_done_callback", None)
    if add is None:
        return None
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finished(_: object) -> None:
        if not done.done():
            done.set_result(None)

    add(finished)
    return done


def pool_from_json(text: str, namespace: str | None = None) -> SandboxPool:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"pool is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("pool must be a JSON object")
    data.setdefault("apiVersion", API_VERSION)
    data.setdefault("kind", "SandboxPool")
    data.pop("status", None)
    pool = _validated(lambda: SandboxPool.model_validate(data))
    if namespace and not data.get("metadata", {}).get("namespace"):
        pool.metadata.namespace = namespace
    return pool


async def _readable(items: list[Sandbox]) -> list[Sandbox]:
    """`items` with the env values of every sandbox the caller may list but not read blanked
    (names stay: they say which variables exist, not what they hold)."""
    caller = current_caller()
    if caller is None:
        return items
    out = []
    for sb in items:
        shown = sb
        if not await caller.may(Action("get", "sandboxes", sb.metadata.namespace)):
            shown = sb.model_copy(deep=True)
            for var in shown.spec.env:
                var.value = ""
        out.append(shown)
    return out


class FastPathService(IoRelayRpcs, TokenRpcs, fastpath_pb2_grpc.FastPathServicer):
    """Sandboxes and pools here; exec and files (relayed to agents) in `IoRelayRpcs`, tenant
    tokens in `TokenRpcs`. Who may call what is decided before any of these run
    (`access.AccessGuard`)."""

    def __init__(self, sandboxes: SandboxService, pools: PoolManager, store: ObjectStore) -> None:
        self.sandboxes = sandboxes
        self.pools = pools
        self.store = store
        self.updates = SandboxUpdates(sandboxes)
        self.metrics: Metrics | None = None

    def _count_create(
        self, mode: str, outcome: str, seconds: float | None = None, warm: bool = False
    ) -> None:
        if self.metrics is None:
            return
        self.metrics.creates_total.labels(mode=mode, outcome=outcome).inc()
        if seconds is not None:
            label = "true" if warm else "false"
            self.metrics.create_seconds.labels(mode=mode, warm=label).observe(seconds)

    async def _guard(self, context: grpc.aio.ServicerContext[Any, Any], call: Awaitable[T]) -> T:
        try:
            return await call
        except FsbError as exc:
            await context.abort(exc.grpc_code, exc.message)
            raise AssertionError("unreachable") from exc

    # -- sandboxes -------------------------------------------------------------------------
    async def Create(
        self,
        request: fastpath_pb2.CreateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> fastpath_pb2.CreateResponse:
        arrived = time.perf_counter()
        replied = _finished(context)

        async def create() -> Sandbox:
            sb = sandbox_from_request(request)
            mode = request.mode or ConsistencyMode.FAST.value
            if mode not in {m.value for m in ConsistencyMode}:
                raise InvalidArgument("mode: must be fast or strong")
            digest = ""
            if request.idempotency_key:
                # What a replay with the same key must match (only then is it compared).
                fingerprint = MessageToDict(request, preserving_proto_field_name=True)
                fingerprint.pop("mode", None)
                fingerprint.pop("idempotency_key", None)
                # Not part of what the sandbox is (and a password has no business in a hash).
                fingerprint.pop("pull_credentials", None)
                digest = request_hash(json.dumps(fingerprint, sort_keys=True))
            opts = CreateOptions(
                mode=ConsistencyMode(mode),
                idempotency_key=request.idempotency_key,
                request_hash=digest,
                arrived=arrived,
                deadline=_deadline(context),
                pull_credentials=_pull_credentials(request),
                replied=replied,
            )
            try:
                created = await self.sandboxes.create(sb, opts)
            except CapacityExhausted:
                # The pool cannot grow or the wait for it ran out: RESOURCE_EXHAUSTED; demand
                # stays noted, so a pool still growing has room for a retry.
                self.pools.note_demand(sb.metadata.namespace, sb.spec.pool_ref, sb.metadata.name)
                self._count_create(mode, "CapacityExhausted")
                raise
            except FsbError as exc:
                self._count_create(mode, type(exc).__name__)
                raise
            timings = created.status.timings
            warm = bool(timings is not None and timings.warm)
            self._count_create(mode, "ok", time.perf_counter() - arrived, warm)
            return created

        sb = await self._guard(context, create())
        status, timings = sb.status, sb.status.timings
        fields = {
            "sandbox": f"{sb.metadata.namespace}/{sb.metadata.name}",
            "agent": status.assigned_agent,
            "ms": timings.runtime_ready_ms if timings else None,
        }
        # Logged once the answer is out: a formatted record costs 0.2 to 0.4 ms here, which a
        # warm create's caller would otherwise wait for.
        if replied is None:
            log.info("sandbox created", extra=fields)
        else:
            replied.add_done_callback(lambda _: log.info("sandbox created", extra=fields))
        return fastpath_pb2.CreateResponse(
            name=sb.metadata.name,
            namespace=sb.metadata.namespace,
            uid=sb.metadata.uid,
            container_id=status.container_id,
            agent=status.assigned_agent,
            agent_ip=status.agent_ip,
            endpoints=status.endpoints,
            phase=status.phase.value,
            timings=fastpath_pb2.Timings(
                accepted_ms=timings.accepted_ms if timings else 0,
                scheduled_ms=(timings.scheduled_ms or 0) if timings else 0,
                runtime_ready_ms=(timings.runtime_ready_ms or 0) if timings else 0,
                pulled_ms=(timings.pulled_ms or 0) if timings else 0,
                scaled_ms=(timings.scaled_ms or 0) if timings else 0,
            ),
            object_json=_json(sb),
        )

    async def Get(
        self, request: fastpath_pb2.ObjectRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.ObjectReply:
        sb = await self._guard(
            context, self.sandboxes.get(request.namespace or "default", request.name)
        )
        return fastpath_pb2.ObjectReply(object_json=_json(sb))

    async def List(
        self, request: fastpath_pb2.ListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.ListReply:
        items = await self._guard(
            context,
            self.sandboxes.list(request.namespace or None, dict(request.label_selector) or None),
        )
        items = [
            s
            for s in items
            if (not request.pool_ref or s.spec.pool_ref == request.pool_ref)
            and (not request.phase or s.status.phase.value == request.phase)
        ]
        items = await _readable(items)
        return fastpath_pb2.ListReply(objects_json=[_json(s) for s in items])

    async def Delete(
        self, request: fastpath_pb2.DeleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.DeleteReply:
        sb = await self._guard(
            context,
            self.sandboxes.delete(request.namespace or "default", request.name, wait=request.wait),
        )
        return fastpath_pb2.DeleteReply(phase=sb.status.phase.value if sb else "Deleted")

    async def Update(
        self, request: fastpath_pb2.UpdateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.ObjectReply:
        async def update() -> Sandbox:
            check_labels(request.labels, "metadata.labels")
            patch = patch_from_request(request, arrived=now())
            return await self.updates.update(request.namespace or "default", request.name, patch)

        sb = await self._guard(context, update())
        return fastpath_pb2.ObjectReply(object_json=_json(sb))

    async def Reset(
        self, request: fastpath_pb2.ObjectRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.ObjectReply:
        sb = await self._guard(
            context, self.updates.reset(request.namespace or "default", request.name)
        )
        return fastpath_pb2.ObjectReply(object_json=_json(sb))

    async def ListEvents(
        self, request: fastpath_pb2.EventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.EventsReply:
        async def events() -> list[Event]:
            kind = request.kind or "Sandbox"
            if kind not in KINDS:
                raise InvalidArgument(f"kind: must be {' or '.join(KINDS)}, not {kind!r}")
            if request.limit < 0:
                raise InvalidArgument("limit: must not be negative")
            namespace = request.namespace or "default"
            # NOT_FOUND for a missing object, as `get` says: "no events" would hide a typo.
            if kind == "SandboxPool":
                await self.store.get(SandboxPool, namespace, request.name)
            else:
                await self.sandboxes.get(namespace, request.name)
            return await self.store.list_events(
                kind, namespace, request.name, request.limit or DEFAULT_EVENT_LIMIT
            )

        found = await self._guard(context, events())
        return fastpath_pb2.EventsReply(
            events_json=[e.model_dump_json(by_alias=True) for e in found]
        )

    async def Logs(
        self, request: fastpath_pb2.LogsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[fastpath_pb2.LogChunk]:
        stream = self.sandboxes.logs(
            request.namespace or "default",
            request.name,
            follow=request.follow,
            tail_lines=request.tail_lines,
            since_unix=request.since_unix,
        )
        try:
            async for chunk in stream:
                yield fastpath_pb2.LogChunk(
                    data=chunk.data, stream=chunk.stream, timestamp=chunk.timestamp
                )
        except FsbError as exc:
            await context.abort(exc.grpc_code, exc.message)

    async def RenewLease(
        self, request: fastpath_pb2.RenewLeaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.RenewLeaseReply:
        return await self._guard(context, lease.renew(self.sandboxes, request))

    # -- pools -----------------------------------------------------------------------------
    async def CreatePool(
        self, request: fastpath_pb2.PoolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.ObjectReply:
        async def create() -> SandboxPool:
            return await self.pools.create(pool_from_json(request.object_json))

        pool = await self._guard(context, create())
        return fastpath_pb2.ObjectReply(object_json=_json(pool))

    async def GetPool(
        self, request: fastpath_pb2.ObjectRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.ObjectReply:
        pool = await self._guard(
            context, self.store.get(SandboxPool, request.namespace or "default", request.name)
        )
        return fastpath_pb2.ObjectReply(object_json=_json(pool))

    async def ListPools(
        self, request: fastpath_pb2.ListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.ListReply:
        pools = await self._guard(
            context,
            self.store.list(
                SandboxPool, request.namespace or None, dict(request.label_selector) or None
            ),
        )
        return fastpath_pb2.ListReply(objects_json=[_json(p) for p in pools])

    async def UpdatePool(
        self, request: fastpath_pb2.PoolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.ObjectReply:
        async def update() -> SandboxPool:
            return await self.pools.update(pool_from_json(request.object_json))

        pool = await self._guard(context, update())
        return fastpath_pb2.ObjectReply(object_json=_json(pool))

    async def DeletePool(
        self, request: fastpath_pb2.ObjectRef, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.DeleteReply:
        await self._guard(context, self.pools.delete(request.namespace or "default", request.name))
        return fastpath_pb2.DeleteReply(phase="Deleted")
