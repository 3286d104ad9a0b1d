"""The API objects: `Sandbox` and `SandboxPool` (`API_VERSION`, api/labels.py).

These pydantic models are the single source of truth for the object model (DESIGN.md §3): the
Fast-Path validates requests with them, the stores persist their JSON, and the Kubernetes CRD
schemas are generated from them. Field names are snake_case in Python and camelCase on the wire.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from fastsandbox.api import log_caps as _log_caps
from fastsandbox.api import quantity
from fastsandbox.api._base import _Model
from fastsandbox.api.agent_template import AGENT_TEMPLATE_FIELDS, AgentTemplate
from fastsandbox.api.labels import API_GROUP, API_VERSION, CLEANUP_FINALIZER, ApiVersion

# Defined in api/labels.py; still importable from here for code written before it existed.
__reexported__ = (API_GROUP, CLEANUP_FINALIZER)

DEFAULT_NAMESPACE = "default"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
# Kubernetes' container env name rule (before 1.30 relaxed it): the apiserver and the models agree.
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


# Log caps: defined once, in api/log_caps.py (light: settings and the CLI import it
# without pydantic); re-exported here for the models' users.
MIN_LOG_MAX_BYTES = _log_caps.MIN_LOG_MAX_BYTES
DEFAULT_LOG_MAX_BYTES = _log_caps.DEFAULT_LOG_MAX_BYTES


def _dns_name(value: str) -> str:
    if not value:
        raise ValueError("required")
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(
            "must be a DNS label: lowercase letters, digits and '-', at most 63 characters"
        )
    return value


def _required_str(value: str) -> str:
    if not value.strip():
        raise ValueError("required")
    return value


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be 1..65535")
    return value


def _cidr(value: str) -> str:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IPv4 CIDR with its host bits zero (e.g. 192.0.2.0/24)"
        ) from None
    if net.version != 4:
        raise ValueError(f"{value!r}: only IPv4 CIDRs are supported")
    return str(net)


def is_env_name(value: str) -> bool:
    """What a sandbox's environment variable may be called (the agent checks it too)."""
    return bool(_ENV_NAME.match(value))


def _env_name(value: str) -> str:
    if not is_env_name(value):
        raise ValueError(
            "must be an environment variable name: letters, digits, '_', '-' or '.',"
            " not starting with a digit"
        )
    return value


def _cpu(value: str) -> str:
    return quantity.check_cpu(value)


def _memory(value: str) -> str:
    return quantity.check_memory(value)


def _disk(value: str) -> str:
    return quantity.check_disk(value)


def _pids(value: int) -> int:
    return quantity.check_pids(value)


def _log_max(value: int) -> int:
    if value < MIN_LOG_MAX_BYTES:
        raise ValueError(f"{value} is below the minimum {MIN_LOG_MAX_BYTES} bytes")
    return value


DnsName = Annotated[str, AfterValidator(_dns_name)]
RequiredStr = Annotated[str, AfterValidator(_required_str)]
Port = Annotated[int, AfterValidator(_port)]


def now() -> datetime:
    return datetime.now(UTC)


class FailurePolicy(StrEnum):
    MANUAL = "Manual"
    AUTO_RECREATE = "AutoRecreate"


class Runtime(StrEnum):
    RUNC = "runc"
    GVISOR = "gvisor"


class NetworkMode(StrEnum):
    """`private`: each sandbox has its own network namespace and address (DESIGN.md §6b);
    `shared`: sandboxes join their agent's namespace (ports exclusive per agent)."""

    PRIVATE = "private"
    SHARED = "shared"


class Egress(StrEnum):
    """Outbound traffic of a private sandbox: `none` (the default) or `allow` (NAT)."""

    NONE = "none"
    ALLOW = "allow"


class ConsistencyMode(StrEnum):
    FAST = "fast"
    STRONG = "strong"


class ObjectMeta(_Model):
    name: DnsName
    namespace: DnsName = DEFAULT_NAMESPACE
    uid: str = ""
    resource_version: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    finalizers: list[str] = Field(default_factory=list)
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None


class EnvVar(_Model):
    name: Annotated[RequiredStr, AfterValidator(_env_name)]
    value: str = ""


class ResourceList(_Model):
    """Kubernetes-style quantities: cpu `"500m"` or `"2"`, memory `"256Mi"`."""

    cpu: str | None = None
    memory: str | None = None

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None and not _QUANTITY.match(value):
            raise ValueError("must be a quantity such as 500m, 2, 256Mi or 1Gi")
        return value


CpuQuantity = Annotated[str, AfterValidator(_cpu)]
MemoryQuantity = Annotated[str, AfterValidator(_memory)]
DiskQuantity = Annotated[str, AfterValidator(_disk)]
PidsLimit = Annotated[int, AfterValidator(_pids)]
LogMaxBytes = Annotated[int, AfterValidator(_log_max)]


class SandboxResources(_Model):
    """A sandbox's limits (cpu `"500m"` or `"2"`, memory and disk `"256Mi"`, pids a count).
    Unset takes the pool's `sandboxDefaults`, then the server's default; a zero, negative or tiny
    value is refused rather than read as "unlimited"."""

    cpu: CpuQuantity | None = None
    memory: MemoryQuantity | None = None
    pids: PidsLimit | None = None
    disk: DiskQuantity | None = None


class SandboxLimits(SandboxResources):
    """A pool's `sandboxDefaults` or `sandboxMax`: resources plus the cap of a sandbox's
    captured log (bytes, newest kept)."""

    log_max_bytes: LogMaxBytes | None = None


LIMIT_FIELDS = ("cpu", "memory", "pids", "disk", "log_max_bytes")


def limit_value(field: str, value: str | int) -> float:
    """A limit as a number comparable with another of the same field."""
    if isinstance(value, int):
        return float(value)
    if field == "cpu":
        return float(quantity.cpu_exact(value))
    return float(quantity.bytes_exact(value))


def _enum_message(enum: type[StrEnum]) -> str:
    names = [member.value for member in enum]
    return "must be " + (" or ".join(names) if len(names) == 2 else ", ".join(names))


class SandboxSpec(_Model):
    image: RequiredStr
    pool_ref: RequiredStr
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)
    working_dir: str = ""
    exposed_ports: list[Port] = Field(default_factory=list)
    expire_time: datetime | None = None
    failure_policy: FailurePolicy = FailurePolicy.MANUAL
    recovery_timeout_seconds: int = Field(default=60, ge=1)
    reset_revision: str = ""
    resources: SandboxResources = Field(default_factory=SandboxResources)
    lease_seconds: int | None = Field(default=None, ge=1)
    """Set: the sandbox lives only while its owner renews the lease (RenewLease) at least this
    often; a lapsed lease deletes it."""

    @field_validator("failure_policy", mode="before")
    @classmethod
    def _policy(cls, value: Any) -> Any:
        # isinstance first: `in` on a set raises TypeError for unhashable input (a list, a dict).
        if not isinstance(value, str) or value not in {p.value for p in FailurePolicy}:
            raise ValueError(_enum_message(FailurePolicy))
        return value

    @field_validator("exposed_ports")
    @classmethod
    def _unique_ports(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("ports must be unique")
        return value

    @field_validator("working_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value


class SandboxPhase(StrEnum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    EXPIRED = "Expired"
    LOST = "Lost"
    TERMINATING = "Terminating"


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: datetime = Field(default_factory=now)


class Timings(_Model):
    """Milliseconds since the request arrived at the Fast-Path (or the object was first seen)."""

    accepted_ms: float = 0.0
    scheduled_ms: float | None = None
    runtime_ready_ms: float | None = None
    pulled_ms: float | None = None
    """Time the agent spent pulling the image for this create (unset when it was cached)."""
    # How long the create waited for its pool to start an agent (None: it found room at once).
    scaled_ms: float | None = None
    warm: bool | None = None
    """The create claimed a warm slot (unset: it made its container)."""


class SandboxStatus(_Model):
    phase: SandboxPhase = SandboxPhase.PENDING
    assigned_agent: str = ""
    agent_ip: str = Field(default="", alias="agentIP")
    endpoints: list[str] = Field(default_factory=list)
    container_id: str = Field(default="", alias="containerID")
    started_at: datetime | None = None
    exit_code: int | None = None
    observed_reset_revision: str = ""
    conditions: list[Condition] = Field(default_factory=list)
    timings: Timings | None = None
    message: str = ""
    lease_expire_time: datetime | None = None
    """When a leased sandbox's lease lapses unless renewed (unset: creation + leaseSeconds)."""


class Sandbox(_Model):
    api_version: ApiVersion = API_VERSION
    kind: Literal["Sandbox"] = "Sandbox"
    metadata: ObjectMeta
    spec: SandboxSpec
    status: SandboxStatus = Field(default_factory=SandboxStatus)

    # Shortcuts for SDK users (`Client().list()` items read like E2B's `SandboxInfo`).
    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def phase(self) -> str:
        return self.status.phase.value


class PoolCapacity(_Model):
    pool_min: int = Field(default=1, ge=0)
    pool_max: int = Field(default=1, ge=0)
    buffer_min: int = Field(default=0, ge=0)
    buffer_max: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.pool_max < self.pool_min:
            raise ValueError("poolMax must be at least poolMin")
        if self.buffer_max and self.buffer_max < self.buffer_min:
            raise ValueError("bufferMax must be at least bufferMin")
        return self


class RollingUpdate(_Model):
    max_unavailable: int = Field(default=0, ge=0)
    max_surge: int = Field(default=1, ge=0)


# Per agent and image; an agent's capacity bounds what it really keeps.
MAX_WARM_SLOTS = 1000


class SandboxPoolSpec(_Model):
    runtime: Runtime = Runtime.RUNC
    capacity: PoolCapacity = Field(default_factory=PoolCapacity)
    max_sandboxes_per_agent: int = Field(default=5, ge=1, le=1000)
    sandbox_defaults: SandboxLimits = Field(default_factory=SandboxLimits)
    """Limits of a sandbox that sets none (log cap default 10 MiB)."""
    sandbox_max: SandboxLimits = Field(default_factory=SandboxLimits)
    """The most a sandbox of this pool may ask for; a create above it is refused."""
    agent_resources: ResourceList = Field(default_factory=ResourceList)
    agent_template: AgentTemplate | None = None
    """The few Pod fields a pool's author may set on its agent Pods (api/agent_template.py)."""
    agent_version: str = ""
    rolling_update: RollingUpdate = Field(default_factory=RollingUpdate)
    prewarm_images: list[RequiredStr] = Field(default_factory=list)
    warm_slots: int = Field(default=0, ge=0, le=MAX_WARM_SLOTS)
    """Per agent and hot image (`prewarmImages`, then the image it served last): containers
    made ahead, waiting for a create of that image, which claims one in milliseconds. They fill
    only capacity no sandbox uses (under gVisor a slot is made with the pool's default limits and
    serves only creates of exactly those: runsc cannot change them). Read by agents when they
    start: a changed value reaches the agents started after the change."""
    network_mode: NetworkMode = NetworkMode.PRIVATE
    """`private` (default): a network namespace per sandbox; `shared`: the agent's."""
    egress: Egress = Egress.NONE
    """Outbound traffic of private sandboxes: `none` (default) or `allow` (NAT)."""
    egress_allow: list[Annotated[str, AfterValidator(_cidr)]] = Field(default_factory=list)
    """With `egress: allow`, only these IPv4 CIDRs (empty: anywhere but the host, other
    agents and link-local/metadata addresses, which stay closed whatever is listed)."""

    @field_validator("network_mode", mode="before")
    @classmethod
    def _network_mode(cls, value: Any) -> Any:
        if not isinstance(value, str) or value not in {m.value for m in NetworkMode}:
            raise ValueError(_enum_message(NetworkMode))
        return value

    @field_validator("egress", mode="before")
    @classmethod
    def _egress(cls, value: Any) -> Any:
        if not isinstance(value, str) or value not in {m.value for m in Egress}:
            raise ValueError(_enum_message(Egress))
        return value

    @model_validator(mode="after")
    def _egress_allow_needs_allow(self) -> Self:
        if self.egress_allow and self.egress is not Egress.ALLOW:
            raise ValueError("egressAllow needs egress: allow")
        if self.egress is not Egress.NONE and self.network_mode is NetworkMode.SHARED:
            raise ValueError("egress applies to networkMode: private only; leave it unset")
        return self

    @field_validator("runtime", mode="before")
    @classmethod
    def _runtime(cls, value: Any) -> Any:
        if not isinstance(value, str) or value not in {r.value for r in Runtime}:
            raise ValueError(_enum_message(Runtime))
        return value

    @model_validator(mode="after")
    def _defaults_within_max(self) -> Self:
        for name in LIMIT_FIELDS:
            default = getattr(self.sandbox_defaults, name)
            most = getattr(self.sandbox_max, name)
            if default is None or most is None:
                continue
            if limit_value(name, default) > limit_value(name, most):
                wire = to_camel(name)
                raise ValueError(
                    f"sandboxDefaults.{wire} ({default}) is above sandboxMax.{wire} ({most})"
                )
        return self


class AgentCounts(_Model):
    total: int = 0
    ready: int = 0
    updated: int = 0
    draining: int = 0


class SlotCounts(_Model):
    total: int = 0
    allocated: int = 0


class WarmSlotStatus(_Model):
    image: str
    ready: int = 0
    """Warm slots of this image ready to be claimed, over the pool's agents."""


class SandboxPoolStatus(_Model):
    agents: AgentCounts = Field(default_factory=AgentCounts)
    slots: SlotCounts = Field(default_factory=SlotCounts)
    cached_images: list[str] = Field(default_factory=list)
    warm_slots: list[WarmSlotStatus] = Field(default_factory=list)
    observed_generation: int = 0
    conditions: list[Condition] = Field(default_factory=list)


class SandboxPool(_Model):
    api_version: ApiVersion = API_VERSION
    kind: Literal["SandboxPool"] = "SandboxPool"
    metadata: ObjectMeta
    spec: SandboxPoolSpec = Field(default_factory=SandboxPoolSpec)
    status: SandboxPoolStatus = Field(default_factory=SandboxPoolStatus)


class Event(_Model):
    """Something that happened to an object, for `fsb describe` (Kubernetes' core/v1 Event,
    trimmed): recorded best effort, never watched, without a resourceVersion.

    `timestamp` is the latest occurrence; `count` says how many times in a row the same
    `type`/`reason`/`message` happened (repeats update one event instead of adding more).
    """

    kind: str
    """`Sandbox` or `SandboxPool`."""
    namespace: str
    name: str
    uid: str = ""
    """The object's uid: an event of an earlier object with the same name is not this one's."""
    type: Literal["Normal", "Warning"] = "Normal"
    reason: str
    """One CamelCase word: Scheduled, Started, Exited, Expired, Reset, AgentLost, ..."""
    message: str = ""
    timestamp: datetime = Field(default_factory=now)
    count: int = Field(default=1, ge=1)

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # Naive times are taken as UTC: every backend stores and orders them the same way.
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


ApiObject = Sandbox | SandboxPool
KINDS: dict[str, type[Sandbox] | type[SandboxPool]] = {
    "Sandbox": Sandbox,
    "SandboxPool": SandboxPool,
}


def to_wire(obj: BaseModel) -> dict[str, Any]:
    """The object as users see it: camelCase keys, RFC 3339 times, unset optionals omitted."""
    data: dict[str, Any] = obj.model_dump(mode="json", by_alias=True, exclude_none=True)
    return data


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the field: `spec.exposedPorts[0]: must be 1..65535`."""
    lines = []
    for err in exc.errors():
        path = prefix
        for part in err["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part.startswith("function-after") or part.startswith("function-before"):
                continue
            elif _PLAIN_KEY.match(part):
                path += ("." if path else "") + part
            else:
                # An odd key (empty, spaces, a colon) is quoted, so the path stays readable.
                path += f"[{part!r}]"
        if err["type"] == "missing":
            message = "required"
        elif err["type"] == "extra_forbidden" and "agentTemplate" in err["loc"]:
            message = f"not allowed in an agentTemplate (only {AGENT_TEMPLATE_FIELDS})"
        elif err["type"] == "extra_forbidden":
            message = "unknown field"
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return "; ".join(lines)


def parse_rfc3339(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("needs a timezone (e.g. 2026-01-01T00:00:00Z)")
    return parsed
