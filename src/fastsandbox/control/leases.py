"""Heartbeat leases: a sandbox created with `spec.leaseSeconds` lives only while its owner renews.

The lease's lapse time is persisted in the record (`status.leaseExpireTime`; before the first
renewal it is `creationTimestamp + leaseSeconds`), so it survives a control-plane restart: the
reconciler lists every record on start, `SandboxLifecycle.converge` sees the lapse time and arms
its timer for it, exactly as it does for `expireTime`. A lapsed lease deletes the sandbox (the
owner is gone; nothing is kept for it), unlike an expiry which keeps an `Expired` record.

Renewal runs in the sandbox's serial section, like every other write of its record, so it never
races the lifecycle's own status writes.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from fastsandbox.api.models import Sandbox, now
from fastsandbox.control.sandboxes import SandboxService
from fastsandbox.errors import Conflict, FailedPrecondition, NotFound

log = logging.getLogger(__name__)

# Attempts of a renewal whose write met a concurrent one (another replica's, on Kubernetes).
_RENEW_ATTEMPTS = 3


def lease_lapses_at(sb: Sandbox) -> datetime | None:
    """When the sandbox's lease lapses, or None when it has no lease."""
    seconds = sb.spec.lease_seconds
    if not seconds:
        return None
    if sb.status.lease_expire_time is not None:
        return sb.status.lease_expire_time
    created = sb.metadata.creation_timestamp or now()
    return created + timedelta(seconds=seconds)


def lease_left(sb: Sandbox) -> float | None:
    """Seconds until the lease lapses (≤ 0: lapsed), or None without a lease."""
    lapse = lease_lapses_at(sb)
    return None if lapse is None else (lapse - now()).total_seconds()


async def renew_lease(service: SandboxService, namespace: str, name: str) -> datetime:
    """Push the lease's lapse time to now + leaseSeconds; returns the new lapse time.

    NotFound when the sandbox is gone or being deleted (its lease cannot save it any more),
    FailedPrecondition when it was created without a lease.
    """
    for attempt in range(_RENEW_ATTEMPTS):
        async with service.locks.hold((namespace, name)):
            sb = await service.store.get(Sandbox, namespace, name)
            if sb.metadata.deletion_timestamp is not None:
                raise NotFound(f"sandbox {namespace}/{name} is being deleted; its lease is over")
            seconds = sb.spec.lease_seconds
            if not seconds:
                raise FailedPrecondition(
                    f"sandbox {namespace}/{name} has no lease (it was created without "
                    "leaseSeconds); nothing to renew"
                )
            left = lease_left(sb)
            if left is not None and left <= 0:
                # Lapsed but not yet collected (the timer is about to fire): too late.
                raise NotFound(f"sandbox {namespace}/{name}: its lease lapsed; it is being deleted")
            lapse = now() + timedelta(seconds=seconds)
            sb.status.lease_expire_time = lapse
            try:
                await service.store.update_status(sb)
            except Conflict:
                if attempt + 1 == _RENEW_ATTEMPTS:
                    raise
                continue
            log.debug("lease renewed", extra={"sandbox": f"{namespace}/{name}"})
            return lapse
    raise AssertionError("unreachable")
