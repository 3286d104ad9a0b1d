"""The RPC x credential matrix, driven by fastpath.proto's service descriptor: every RPC, called
with {no token, a wrong token, a token of another namespace, a token of the right namespace}.

`request_for` builds each RPC's request naming a sandbox/pool in a namespace, from the request
type's fields — so a new RPC gets its cell automatically, and `EXPECT` (the answer for a right
namespace token) must say what it is allowed to do, or the matrix test fails for it.
Shared by tests/unit/test_access.py (a bare servicer behind the guard) and
tests/e2e/test_tenants.py (a real `fsb server`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc

SERVICE = fastpath_pb2.DESCRIPTOR.services_by_name["FastPath"]
METHODS = [m.name for m in SERVICE.methods]

# What a right-namespace tenant token may do: "ok" (past the guard, answered by the servicer),
# "admin" (PERMISSION_DENIED: admin-only). A new RPC missing here fails the matrix test.
_TENANT_RPCS = """
    Create Get List Delete Logs Update Reset ListEvents RenewLease
    CreatePool GetPool ListPools DeletePool UpdatePool
    Exec ListProcesses FileOp ReadFile WriteFile Watch
"""
EXPECT: dict[str, str] = {
    **dict.fromkeys(_TENANT_RPCS.split(), "ok"),
    "CreateToken": "admin",
    "ListTokens": "admin",
    "RevokeToken": "admin",
}


def _fill(msg: Message, namespace: str, name: str) -> None:
    fields = msg.DESCRIPTOR.fields_by_name
    if "namespace" in fields:
        msg.namespace = namespace  # type: ignore[attr-defined]
    if "name" in fields:
        msg.name = name  # type: ignore[attr-defined]
    if "target" in fields:
        msg.target.namespace = namespace  # type: ignore[attr-defined]
        msg.target.name = name  # type: ignore[attr-defined]
    if "object_json" in fields:
        # An invalid capacity: past the guard the servicer refuses it, so no pool (and no
        # agent) is ever made by a matrix cell.
        spec = {"capacity": {"poolMin": -1}}
        body = {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
        msg.object_json = json.dumps(body)  # type: ignore[attr-defined]
    if "path" in fields:
        msg.path = "/tmp/x"  # type: ignore[attr-defined]
    if "id" in fields:
        msg.id = "000000000000"  # type: ignore[attr-defined]


def request_for(method: str, namespace: str, name: str = "matrix-nothing") -> Any:
    """The request (a message, or for a client-streaming RPC the list of messages)."""
    desc = SERVICE.methods_by_name[method]
    cls = getattr(fastpath_pb2, desc.input_type.name, None)
    if cls is None:
        from fastsandbox.api._proto.fastsandbox.v1 import io_pb2

        cls = getattr(io_pb2, desc.input_type.name)
    msg = cls()
    if desc.input_type.name == "ExecInput":
        msg.start.argv.append("true")
        _fill(msg.start, namespace, name)
    elif desc.input_type.name == "WriteFileInput":
        _fill(msg.header, namespace, name)
    elif desc.input_type.name == "FileOpRequest":
        _fill(msg, namespace, name)
        msg.op = "stat"
    else:
        _fill(msg, namespace, name)
    return [msg] if desc.client_streaming else msg


async def call(
    stub: fastpath_pb2_grpc.FastPathStub,
    method: str,
    request: Any,
    token: str | None,
    timeout: float = 30.0,
) -> grpc.StatusCode:
    """The status code the call ends with (OK when it succeeds)."""
    desc = SERVICE.methods_by_name[method]
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    rpc = getattr(stub, method)
    try:
        if desc.client_streaming:

            async def messages() -> AsyncIterator[Any]:
                for m in request:
                    yield m

            call_ = rpc(messages(), metadata=metadata, timeout=timeout)
        else:
            call_ = rpc(request, metadata=metadata, timeout=timeout)
        if desc.server_streaming:
            async for _ in call_:
                pass
        else:
            await call_
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK
