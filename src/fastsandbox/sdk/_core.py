"""The I/O-free core shared by `AsyncClient` and `Client` (lightkube's `generic_client` habit).

Everything that decides *what* to send lives here, once: where the server is and which token and
namespace to use (flags > `FSB_*` env > config file > defaults), how keyword arguments become a
validated `CreateRequest` (so a bad field fails before any RPC, named exactly as the server would
name it), how replies become objects, and the one seam where a gRPC error becomes our error tree.
The only I/O is reading the small config and token files during resolution; no network.

Pydantic models are imported inside functions: `fsb list` only needs JSON, and importing the
models costs more than the rest of the CLI's start-up together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict

import grpc

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2
from fastsandbox.api.labels import API_VERSION
from fastsandbox.errors import FsbError, InvalidArgument

# Resolution lives in `_resolve` (grpc-free, shared with `fsb exec`'s lean client); these names
# stay importable from here.
from fastsandbox.sdk._resolve import (  # noqa: F401
    DEFAULT_NAMESPACE,
    ClientConfig,
    config_path,
    data_dir,
    load_config,
    resolve,
    retry_after_in,
    translate_status,
)

if TYPE_CHECKING:
    from fastsandbox.api.models import Event, Sandbox, SandboxPool, Timings

DEFAULT_POOL = "default-pool"


# --------------------------------------------------------------------------- the error seam


def translate(err: grpc.RpcError, endpoint: str) -> FsbError:
    """The one place a gRPC failure becomes an `FsbError` (and so a CLI exit code): grpc's
    view of the status, handed to `_resolve.translate_status`."""
    code: grpc.StatusCode | None = err.code() if hasattr(err, "code") else None
    details: str = (err.details() if hasattr(err, "details") else "") or ""
    name = code.name if code is not None else None
    return translate_status(name, details, _trailing(err), endpoint)


def _trailing(err: grpc.RpcError) -> Any:
    trailing = getattr(err, "trailing_metadata", None)
    try:
        return trailing() if callable(trailing) else None
    except Exception:  # an error grpc made itself has no metadata to give
        return None


def retry_after_of(err: grpc.RpcError) -> float | None:
    """The `retry-after` seconds in a failed call's trailing metadata, if the server sent one."""
    return retry_after_in(_trailing(err))


# --------------------------------------------------------------------------- requests


EnvInput = Mapping[str, str] | Sequence[str | tuple[str, str] | Mapping[str, str]]


class CreateOptions(TypedDict, total=False):
    """Keyword arguments of `create` (shared by the async and sync clients)."""

    pool: str
    """Pool to run in; default `default-pool`."""
    command: Sequence[str]
    args: Sequence[str]
    env: EnvInput
    """`{"K": "V"}`, or a list of `"K=V"`, `("K", "V")` or `{"name": "K", "value": "V"}`."""
    working_dir: str
    ports: Sequence[int]
    ttl: int | timedelta
    """Seconds until expiry; exclusive with `expire_time`."""
    expire_time: datetime | str
    """RFC 3339 when a string."""
    failure_policy: str
    """`Manual` or `AutoRecreate`."""
    recovery_timeout: int
    labels: Mapping[str, str]
    mode: str
    """`fast` (answer first, persist right after) or `strong` (persist first)."""
    idempotency_key: str
    resources: Mapping[str, str | int]
    """`{"cpu": "500m", "memory": "256Mi", "pids": 256, "disk": "1Gi"}`."""
    lease: int
    """Seconds: the sandbox is deleted unless its lease is renewed at least this often."""
    namespace: str
    pull_credentials: tuple[str, str]
    """`(username, password)` for the image's registry: to pull a private image, and to use one
    already cached on the node (it is refused without credentials the registry accepts)."""


class PoolOptions(TypedDict, total=False):
    """Keyword arguments of `create_pool`."""

    runtime: str
    """`runc` or `gvisor`."""
    pool_min: int
    pool_max: int
    """Default: `pool_min`."""
    buffer_min: int
    buffer_max: int
    per_agent: int
    """Sandboxes per agent (`maxSandboxesPerAgent`)."""
    prewarm_images: Sequence[str]
    warm_slots: int
    network_mode: str
    """`private` (default: a network namespace per sandbox) or `shared` (the agent's)."""
    egress: str
    """`none` (default) or `allow` (NAT; private pools only)."""
    egress_allow: Sequence[str]
    """With `egress="allow"`: only these IPv4 CIDRs."""
    labels: Mapping[str, str]
    namespace: str


def _validated(build: Any, prefix: str) -> Any:
    from pydantic import ValidationError

    from fastsandbox.api.models import describe_validation_error

    try:
        return build()
    except ValidationError as exc:
        raise InvalidArgument(describe_validation_error(exc, prefix)) from None


def env_list(env: EnvInput | None) -> list[dict[str, str]]:
    """Normalise every accepted env shape to Kubernetes-style `[{name, value}]`."""
    if env is None:
        return []
    if isinstance(env, Mapping):
        return [{"name": str(k), "value": str(v)} for k, v in env.items()]
    if isinstance(env, str):
        raise InvalidArgument("spec.env: must be a mapping or a list of NAME=VALUE")
    out: list[dict[str, str]] = []
    for i, item in enumerate(env):
        if isinstance(item, str):
            name, sep, value = item.partition("=")
            if not sep:
                raise InvalidArgument(f"spec.env[{i}]: {item!r} is not NAME=VALUE")
            out.append({"name": name, "value": value})
        elif isinstance(item, Mapping):
            out.append({"name": str(item.get("name", "")), "value": str(item.get("value", ""))})
        elif isinstance(item, tuple) and len(item) == 2:
            out.append({"name": str(item[0]), "value": str(item[1])})
        else:
            raise InvalidArgument(f"spec.env[{i}]: expected NAME=VALUE, got {item!r}")
    return out


def _str_list(value: Sequence[str] | None, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        raise InvalidArgument(f"{field}: must be a list of strings, not one string")
    return [str(v) for v in value]


def _expire_time(value: datetime | str) -> datetime:
    from fastsandbox.api.models import parse_rfc3339

    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidArgument("spec.expireTime: needs a timezone")
        return value
    try:
        return parse_rfc3339(value)
    except ValueError as exc:
        detail = str(exc) if "timezone" in str(exc) else "must be RFC 3339"
        raise InvalidArgument(
            f"spec.expireTime: {detail} (e.g. 2026-01-01T00:00:00Z), got {value!r}"
        ) from None


def _ttl_seconds(ttl: int | timedelta) -> int:
    seconds = int(ttl.total_seconds()) if isinstance(ttl, timedelta) else int(ttl)
    if seconds <= 0:
        raise InvalidArgument("spec.ttlSeconds: must be positive")
    return seconds


def create_request(
    namespace: str, name: str, image: str, options: CreateOptions
) -> fastpath_pb2.CreateRequest:
    """Validate with the API models, then build the request from the validated values."""
    from fastsandbox.api.models import ConsistencyMode, ObjectMeta, SandboxSpec

    meta = _validated(
        lambda: ObjectMeta(name=name, namespace=namespace, labels=dict(options.get("labels", {}))),
        "metadata",
    )
    if options.get("ttl") is not None and options.get("expire_time") is not None:
        raise InvalidArgument("spec.expireTime: give either a TTL or an expire time, not both")
    spec_in: dict[str, Any] = {
        "image": image or "",
        # An explicit empty pool is an error worth naming, not a request for the default.
        "poolRef": DEFAULT_POOL if options.get("pool") is None else options.get("pool"),
        "command": _str_list(options.get("command"), "spec.command"),
        "args": _str_list(options.get("args"), "spec.args"),
        "env": env_list(options.get("env")),
        "workingDir": options.get("working_dir") or "",
        "exposedPorts": list(options.get("ports") or []),
    }
    if options.get("failure_policy"):
        spec_in["failurePolicy"] = options["failure_policy"]
    if options.get("recovery_timeout") is not None:
        spec_in["recoveryTimeoutSeconds"] = options["recovery_timeout"]
    if options.get("resources"):
        spec_in["resources"] = dict(options["resources"])
    if options.get("lease") is not None:
        spec_in["leaseSeconds"] = options["lease"]
    expire = options.get("expire_time")
    if expire is not None:
        spec_in["expireTime"] = _expire_time(expire)
    spec = _validated(lambda: SandboxSpec.model_validate(spec_in), "spec")
    ttl = options.get("ttl")
    mode = options.get("mode") or ""
    if mode and mode not in {m.value for m in ConsistencyMode}:
        raise InvalidArgument(f"mode: must be fast or strong, got {mode!r}")

    req = fastpath_pb2.CreateRequest(
        namespace=meta.namespace,
        name=meta.name,
        image=spec.image,
        command=spec.command,
        args=spec.args,
        env=[fastpath_pb2.EnvVar(name=e.name, value=e.value) for e in spec.env],
        working_dir=spec.working_dir,
        exposed_ports=spec.exposed_ports,
        pool_ref=spec.pool_ref,
        expire_time=spec.expire_time.isoformat() if spec.expire_time else "",
        ttl_seconds=_ttl_seconds(ttl) if ttl is not None else 0,
        failure_policy=spec.failure_policy.value if "failurePolicy" in spec_in else "",
        recovery_timeout_seconds=(
            spec.recovery_timeout_seconds if "recoveryTimeoutSeconds" in spec_in else 0
        ),
        labels=meta.labels,
        mode=mode,
        idempotency_key=options.get("idempotency_key") or "",
        lease_seconds=spec.lease_seconds or 0,
    )
    creds = options.get("pull_credentials")
    if creds is not None:
        user, password = creds
        req.pull_credentials.username = user
        req.pull_credentials.password = password
    if "resources" in spec_in:
        req.resources.cpu = spec.resources.cpu or ""
        req.resources.memory = spec.resources.memory or ""
        req.resources.pids = spec.resources.pids or 0
        req.resources.disk = spec.resources.disk or ""
    return req


def pool_request(namespace: str, name: str, options: PoolOptions) -> fastpath_pb2.PoolRequest:
    from fastsandbox.api.models import SandboxPool, to_wire

    pool_min = options.get("pool_min")
    pool_max = options.get("pool_max")
    capacity: dict[str, int] = {}
    if pool_min is not None:
        capacity["poolMin"] = pool_min
    if pool_max is not None:
        capacity["poolMax"] = pool_max
    elif pool_min is not None:
        capacity["poolMax"] = max(pool_min, 1)
    if options.get("buffer_min") is not None:
        capacity["bufferMin"] = options["buffer_min"]
    if options.get("buffer_max") is not None:
        capacity["bufferMax"] = options["buffer_max"]
    spec: dict[str, Any] = {"capacity": capacity}
    if options.get("runtime"):
        spec["runtime"] = options["runtime"]
    if options.get("per_agent") is not None:
        spec["maxSandboxesPerAgent"] = options["per_agent"]
    if options.get("prewarm_images") is not None:
        spec["prewarmImages"] = _str_list(options["prewarm_images"], "spec.prewarmImages")
    if options.get("warm_slots") is not None:
        spec["warmSlots"] = options["warm_slots"]
    if options.get("network_mode"):
        spec["networkMode"] = options["network_mode"]
    if options.get("egress"):
        spec["egress"] = options["egress"]
    if options.get("egress_allow") is not None:
        spec["egressAllow"] = _str_list(options["egress_allow"], "spec.egressAllow")
    body = {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(options.get("labels", {})),
        },
        "spec": spec,
    }
    pool = _validated(lambda: SandboxPool.model_validate(body), "")
    wire = to_wire(pool)
    wire.pop("status", None)
    return fastpath_pb2.PoolRequest(object_json=json.dumps(wire, separators=(",", ":")))


def pool_object_request(
    pool: SandboxPool | Mapping[str, Any], namespace: str
) -> fastpath_pb2.PoolRequest:
    """A whole SandboxPool (model, or its camelCase dict as in YAML), validated, status dropped;
    `namespace` fills an empty metadata.namespace."""
    from fastsandbox.api.models import SandboxPool, to_wire

    if isinstance(pool, Mapping):
        body = {"apiVersion": API_VERSION, "kind": "SandboxPool", **pool}
        body.pop("status", None)
        meta = dict(body.get("metadata") or {})
        meta["namespace"] = meta.get("namespace") or namespace
        body["metadata"] = meta
        model: SandboxPool = _validated(lambda: SandboxPool.model_validate(body), "")
    else:
        model = pool
    wire = to_wire(model)
    wire.pop("status", None)
    wire["metadata"]["namespace"] = wire["metadata"].get("namespace") or namespace
    return fastpath_pb2.PoolRequest(object_json=json.dumps(wire, separators=(",", ":")))


def list_request(namespace: str, labels: Mapping[str, str] | None) -> fastpath_pb2.ListRequest:
    """`namespace=""` lists every namespace."""
    return fastpath_pb2.ListRequest(namespace=namespace, label_selector=dict(labels or {}))


def update_request(
    namespace: str,
    name: str,
    *,
    ttl: int | timedelta | None = None,
    expire_time: datetime | str | None = None,
    no_expiry: bool = False,
    labels: Mapping[str, str | None] | None = None,
    failure_policy: str | None = None,
    recovery_timeout: int | None = None,
) -> fastpath_pb2.UpdateRequest:
    """Validate an update like the server does; a label whose value is None is removed."""
    from fastsandbox.api.models import ObjectMeta, SandboxSpec

    given = [
        flag
        for flag, present in (
            ("ttl", ttl is not None),
            ("expire_time", expire_time is not None),
            ("no_expiry", no_expiry),
        )
        if present
    ]
    if len(given) > 1:
        raise InvalidArgument(
            "spec.expireTime: give only one of ttl, expire_time, no_expiry "
            f"(got {', '.join(given)})"
        )
    labels = dict(labels or {})
    added = {str(k): str(v) for k, v in labels.items() if v is not None}
    removed = [str(k) for k, v in labels.items() if v is None]
    if any(not key for key in (*added, *removed)):
        raise InvalidArgument("metadata.labels: a label needs a key")
    _validated(lambda: ObjectMeta(name=name, namespace=namespace, labels=added), "metadata")
    fields: dict[str, Any] = {}
    if failure_policy is not None:
        fields["failurePolicy"] = failure_policy
    if recovery_timeout is not None:
        if recovery_timeout > 2**31 - 1:
            raise InvalidArgument("spec.recoveryTimeoutSeconds: too large")
        fields["recoveryTimeoutSeconds"] = recovery_timeout
    # Placeholders for the required fields: only the given ones can fail, named as on create.
    _validated(lambda: SandboxSpec.model_validate({"image": "-", "poolRef": "-", **fields}), "spec")
    req = fastpath_pb2.UpdateRequest(
        namespace=namespace,
        name=name,
        clear_expiry=no_expiry,
        labels=added,
        remove_labels=removed,
    )
    if ttl is not None:
        req.ttl_seconds = _ttl_seconds(ttl)
    if expire_time is not None:
        req.expire_time = _expire_time(expire_time).isoformat()
    if failure_policy is not None:
        req.failure_policy = failure_policy
    if recovery_timeout is not None:
        req.recovery_timeout_seconds = recovery_timeout
    if not (given or added or removed or fields):
        raise InvalidArgument(
            "nothing to update: give a ttl, an expire time, no-expiry, labels, "
            "a failure policy or a recovery timeout"
        )
    return req


# --------------------------------------------------------------------------- replies


def parse_wire(text: str) -> dict[str, Any]:
    """A reply's object as the user-facing dict (what `-o json` prints), without pydantic."""
    try:
        data = json.loads(text)
    except ValueError:
        raise FsbError("the server sent an object that is not JSON: upgrade fsb") from None
    if not isinstance(data, dict):
        raise FsbError("the server sent an object that is not a JSON object: upgrade fsb")
    return data


EVENT_KINDS = ("Sandbox", "SandboxPool")


def events_request(
    namespace: str, name: str, *, kind: str = "Sandbox", limit: int = 0
) -> fastpath_pb2.EventsRequest:
    if kind not in EVENT_KINDS:
        raise InvalidArgument(f"kind: must be Sandbox or SandboxPool, not {kind!r}")
    if not 0 <= limit <= 2**31 - 1:
        raise InvalidArgument("limit: must be 0 (the server's default) or more")
    return fastpath_pb2.EventsRequest(namespace=namespace, name=name, kind=kind, limit=limit)


def event_from_wire(data: Mapping[str, Any]) -> Event:
    from fastsandbox.api.models import Event

    result: Event = _validated(lambda: Event.model_validate(data), "")
    return result


def sandbox_from_wire(data: Mapping[str, Any]) -> Sandbox:
    from fastsandbox.api.models import Sandbox

    result: Sandbox = _validated(lambda: Sandbox.model_validate(data), "")
    return result


def pool_from_wire(data: Mapping[str, Any]) -> SandboxPool:
    from fastsandbox.api.models import SandboxPool

    result: SandboxPool = _validated(lambda: SandboxPool.model_validate(data), "")
    return result


@dataclass(frozen=True, slots=True)
class CreateResult:
    """What `create` answers: where the sandbox runs and how long each step took."""

    name: str
    namespace: str
    uid: str
    container_id: str
    agent: str
    agent_ip: str
    endpoints: tuple[str, ...]
    phase: str
    timings: Timings
    object: Sandbox
    """The whole object as the server stored (or is about to store) it."""


def create_result(resp: fastpath_pb2.CreateResponse) -> CreateResult:
    from fastsandbox.api.models import Timings

    obj = sandbox_from_wire(parse_wire(resp.object_json))
    # The object's timings keep "not reached" as None; the reply's proto fields cannot.
    timings = obj.status.timings
    if timings is None:
        timings = Timings(
            accepted_ms=resp.timings.accepted_ms,
            scheduled_ms=resp.timings.scheduled_ms or None,
            runtime_ready_ms=resp.timings.runtime_ready_ms or None,
            pulled_ms=resp.timings.pulled_ms or None,
            scaled_ms=resp.timings.scaled_ms or None,
        )
    return CreateResult(
        name=resp.name or obj.metadata.name,
        namespace=resp.namespace or obj.metadata.namespace,
        uid=resp.uid or obj.metadata.uid,
        container_id=resp.container_id or obj.status.container_id,
        agent=resp.agent or obj.status.assigned_agent,
        agent_ip=resp.agent_ip or obj.status.agent_ip,
        endpoints=tuple(resp.endpoints) or tuple(obj.status.endpoints),
        phase=resp.phase or obj.status.phase.value,
        timings=timings,
        object=obj,
    )


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A tenant token as the server lists it: never its secret."""

    id: str
    namespace: str
    created: str
    """RFC 3339, UTC."""
    expires: str
    """RFC 3339, UTC; empty when it never expires."""


def token_info(msg: fastpath_pb2.TokenInfo) -> TokenInfo:
    return TokenInfo(id=msg.id, namespace=msg.namespace, created=msg.created, expires=msg.expires)


def ttl_seconds(ttl: int | timedelta | None) -> int:
    return 0 if ttl is None else _ttl_seconds(ttl)
