"""Update and Reset: the two ways a user changes a sandbox that already exists.

Both only write the object's spec and metadata; what follows from the new values is the
reconciler's (a new `spec.resetRevision` recreates the container, a new `spec.expireTime` moves the
deadline). Each write runs in the sandbox's serial section and goes through the store's optimistic
concurrency: a `Conflict` (someone wrote in between, e.g. a status update) re-reads and applies the
change again, so nothing anyone else wrote is lost.

Rules a caller can rely on:
- A request is validated before the sandbox is looked up, with the same models as create, so a bad
  field is INVALID_ARGUMENT naming it (`spec.failurePolicy: must be Manual or AutoRecreate`).
- Expiry: at most one of `ttl_seconds` (counted from when the update arrives), `expire_time`
  (RFC 3339) and `clear_expiry` (never expire).
- Labels are merged: `labels` adds or overwrites keys, `remove_labels` drops keys. An empty value
  is an ordinary label value, not a removal.
- A sandbox being deleted cannot be changed (Conflict); an Expired one cannot be reset or given
  a new expiry (its container is gone), though its labels can still change.
- A reset revision is the time of the reset in RFC 3339 with milliseconds (UTC), strictly later
  than the previous revision, so every reset is a new value even within one millisecond.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2
from fastsandbox.api.models import (
    DEFAULT_NAMESPACE,
    FailurePolicy,
    ObjectMeta,
    Sandbox,
    SandboxPhase,
    SandboxSpec,
    describe_validation_error,
    now,
    parse_rfc3339,
)
from fastsandbox.control.sandboxes import SandboxService
from fastsandbox.errors import Conflict, InvalidArgument

log = logging.getLogger(__name__)

# Optimistic-concurrency retries before the caller is told to try again.
ATTEMPTS = 8
_FIRST_BACKOFF = 0.01
_MS = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class SandboxPatch:
    """A validated update. `expiry_set` says whether `expire_time` is to be written at all
    (then None means "never expire")."""

    expiry_set: bool = False
    expire_time: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    remove_labels: tuple[str, ...] = ()
    failure_policy: FailurePolicy | None = None
    recovery_timeout_seconds: int | None = None

    def empty(self) -> bool:
        return not (
            self.expiry_set
            or self.labels
            or self.remove_labels
            or self.failure_policy is not None
            or self.recovery_timeout_seconds is not None
        )


def _spec_fields(fields: dict[str, Any]) -> SandboxSpec:
    """Validate `fields` with the create-time model; the required fields get placeholders so
    only the given fields can fail, and each error names its field (`spec.<field>`)."""
    try:
        return SandboxSpec.model_validate({"image": "-", "poolRef": "-", **fields})
    except ValidationError as exc:
        raise InvalidArgument(describe_validation_error(exc, "spec")) from None


def patch_from_request(req: fastpath_pb2.UpdateRequest, *, arrived: datetime) -> SandboxPatch:
    """Turn a Fast-Path request into a validated patch (INVALID_ARGUMENT naming the field)."""
    try:
        meta = ObjectMeta(
            name=req.name, namespace=req.namespace or DEFAULT_NAMESPACE, labels=dict(req.labels)
        )
    except ValidationError as exc:
        raise InvalidArgument(describe_validation_error(exc, "metadata")) from None
    both = sorted(set(req.labels) & set(req.remove_labels))
    if both:
        raise InvalidArgument(f"metadata.labels: {', '.join(both)} both set and removed")
    if any(not key for key in req.remove_labels):
        raise InvalidArgument("metadata.labels: a label to remove needs a key")

    given = [
        flag
        for flag, present in (
            ("ttl_seconds", req.HasField("ttl_seconds")),
            ("expire_time", req.HasField("expire_time")),
            ("clear_expiry", req.clear_expiry),
        )
        if present
    ]
    if len(given) > 1:
        raise InvalidArgument(
            f"spec.expireTime: give only one of ttl_seconds, expire_time, clear_expiry "
            f"(got {', '.join(given)})"
        )
    fields: dict[str, Any] = {}
    if req.HasField("ttl_seconds"):
        if req.ttl_seconds <= 0:
            raise InvalidArgument("spec.ttlSeconds: must be positive")
        try:
            fields["expireTime"] = arrived + timedelta(seconds=req.ttl_seconds)
        except OverflowError:
            raise InvalidArgument("spec.ttlSeconds: too large") from None
    elif req.HasField("expire_time"):
        try:
            fields["expireTime"] = parse_rfc3339(req.expire_time)
        except ValueError as exc:
            detail = str(exc) if "timezone" in str(exc) else "must be RFC 3339"
            raise InvalidArgument(
                f"spec.expireTime: {detail} (e.g. 2026-01-01T00:00:00Z), got {req.expire_time!r}"
            ) from None
    if req.HasField("failure_policy"):
        fields["failurePolicy"] = req.failure_policy
    if req.HasField("recovery_timeout_seconds"):
        fields["recoveryTimeoutSeconds"] = req.recovery_timeout_seconds
    spec = _spec_fields(fields)
    return SandboxPatch(
        expiry_set=bool(given),
        expire_time=spec.expire_time,
        labels=meta.labels,
        remove_labels=tuple(dict.fromkeys(req.remove_labels)),
        failure_policy=spec.failure_policy if "failurePolicy" in fields else None,
        recovery_timeout_seconds=(
            spec.recovery_timeout_seconds if "recoveryTimeoutSeconds" in fields else None
        ),
    )


def describe_patch(patch: SandboxPatch) -> str:
    """What an update changed, in the API's field names, for its event."""
    parts = []
    if patch.expiry_set:
        at = patch.expire_time
        expiry = (
            at.astimezone(UTC).isoformat().replace("+00:00", "Z") if at else "none (never expires)"
        )
        parts.append(f"spec.expireTime {expiry}")
    if patch.labels or patch.remove_labels:
        changes = [f"{k}={v}" for k, v in sorted(patch.labels.items())]
        changes += [f"-{k}" for k in patch.remove_labels]
        parts.append(f"labels {' '.join(changes)}")
    if patch.failure_policy is not None:
        parts.append(f"spec.failurePolicy {patch.failure_policy.value}")
    if patch.recovery_timeout_seconds is not None:
        parts.append(f"spec.recoveryTimeoutSeconds {patch.recovery_timeout_seconds}")
    return "; ".join(parts)


def format_revision(when: datetime) -> str:
    """RFC 3339 in UTC with milliseconds: `2026-01-02T03:04:05.678Z`."""
    utc = when.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def next_revision(previous: str, at: datetime) -> str:
    """A revision for a reset at `at`, strictly later than `previous` when that is one of ours."""
    stamp = at.astimezone(UTC).replace(microsecond=at.microsecond // 1000 * 1000)
    try:
        before = parse_rfc3339(previous) if previous else None
    except ValueError:
        before = None  # set by the user at create time in another shape: any new value will do
    if before is not None and stamp <= before:
        stamp = before.replace(microsecond=before.microsecond // 1000 * 1000) + _MS
    return format_revision(stamp)


class SandboxUpdates:
    """Update and Reset over the `SandboxService`'s store and serial sections."""

    def __init__(self, sandboxes: SandboxService, *, clock: Callable[[], datetime] = now) -> None:
        self.sandboxes = sandboxes
        self.clock = clock

    async def update(self, namespace: str, name: str, patch: SandboxPatch) -> Sandbox:
        if patch.empty():
            raise InvalidArgument(
                "nothing to update: give a ttl, an expire time, no-expiry, labels, "
                "a failure policy or a recovery timeout"
            )

        def change(sb: Sandbox) -> None:
            if patch.expiry_set:
                if sb.status.phase is SandboxPhase.EXPIRED:
                    raise Conflict(
                        f"sandbox {namespace}/{name} has expired and its container is gone; "
                        "its expiry cannot change: create a new sandbox"
                    )
                sb.spec.expire_time = patch.expire_time
            if patch.labels or patch.remove_labels:
                labels = dict(sb.metadata.labels)
                labels.update(patch.labels)
                for key in patch.remove_labels:
                    labels.pop(key, None)
                sb.metadata.labels = labels
            if patch.failure_policy is not None:
                sb.spec.failure_policy = patch.failure_policy
            if patch.recovery_timeout_seconds is not None:
                sb.spec.recovery_timeout_seconds = patch.recovery_timeout_seconds

        stored = await self._write(namespace, name, change)
        self.sandboxes.events.record(stored, "Updated", describe_patch(patch))
        log.info("sandbox updated", extra={"sandbox": f"{namespace}/{name}"})
        return stored

    async def reset(self, namespace: str, name: str) -> Sandbox:
        try:
            ObjectMeta(name=name, namespace=namespace)
        except ValidationError as exc:
            raise InvalidArgument(describe_validation_error(exc, "metadata")) from None

        def change(sb: Sandbox) -> None:
            if sb.status.phase is SandboxPhase.EXPIRED:
                raise Conflict(
                    f"sandbox {namespace}/{name} has expired and its container is gone; "
                    "it cannot be reset: create a new sandbox"
                )
            sb.spec.reset_revision = next_revision(sb.spec.reset_revision, self.clock())

        stored = await self._write(namespace, name, change)
        log.info(
            "sandbox reset requested",
            extra={"sandbox": f"{namespace}/{name}", "revision": stored.spec.reset_revision},
        )
        return stored

    async def _write(self, namespace: str, name: str, change: Callable[[Sandbox], None]) -> Sandbox:
        """Read, check, change and write back in the sandbox's serial section, re-reading on
        Conflict (another writer, such as a status update, got in between)."""
        store = self.sandboxes.store
        delay = _FIRST_BACKOFF
        async with self.sandboxes.locks.hold((namespace, name)):
            for attempt in range(ATTEMPTS):
                sb = await store.get(Sandbox, namespace, name)
                if (
                    sb.metadata.deletion_timestamp is not None
                    or sb.status.phase is SandboxPhase.TERMINATING
                ):
                    raise Conflict(
                        f"sandbox {namespace}/{name} is being deleted and cannot be changed"
                    )
                change(sb)
                try:
                    return await store.update(sb)
                except Conflict:
                    if attempt == ATTEMPTS - 1:
                        break
                    await asyncio.sleep(delay)
                    delay *= 2
        raise Conflict(f"sandbox {namespace}/{name} kept changing while being updated: try again")
