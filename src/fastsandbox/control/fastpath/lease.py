"""The Fast-Path `RenewLease` call: request → `control.leases.renew_lease` → reply."""

from __future__ import annotations

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2
from fastsandbox.control.leases import renew_lease
from fastsandbox.control.sandboxes import SandboxService
from fastsandbox.errors import InvalidArgument


async def renew(
    service: SandboxService, request: fastpath_pb2.RenewLeaseRequest
) -> fastpath_pb2.RenewLeaseReply:
    if not request.name:
        raise InvalidArgument("name: required")
    lapse = await renew_lease(service, request.namespace or "default", request.name)
    stamp = lapse.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return fastpath_pb2.RenewLeaseReply(lease_expire_time=stamp)
