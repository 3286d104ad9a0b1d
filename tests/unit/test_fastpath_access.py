"""The Fast-Path's access gate (`control/fastpath/access.py`) on a real grpc.aio server: every RPC
of the FastPath service x {no token, an unknown token, a caller of another namespace, a caller
of the request's namespace, the admin token}. The servicer behind it answers every call with an
empty reply; the Authenticator/Authorizer are in-memory fakes of the Protocols (the Kubernetes
implementation is tested on a real apiserver: tests/e2e/test_kube_identities.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2
from fastsandbox.control.fastpath.access import (
    RPC_ACCESS,
    Access,
    AccessControl,
    Caller,
    Decision,
    access_of,
)
from tests.infra import free_port

SERVICE = fastpath_pb2.DESCRIPTOR.services_by_name["FastPath"]
METHODS = list(SERVICE.methods)
ADMIN = "admin-token"
# token → (caller, the namespace it may do everything in)
USERS = {"tok-a": (Caller("alice", ("team-a",)), "team-a")}


class FakeIdentities:
    def __init__(self) -> None:
        self.asked: list[Access] = []

    async def authenticate(self, token: str) -> Caller | None:
        return USERS[token][0] if token in USERS else None

    async def authorize(self, caller: Caller, access: Access) -> Decision:
        self.asked.append(access)
        home = next(ns for c, ns in USERS.values() if c == caller)
        return Decision(access.namespace == home, "test RBAC")


def request_in(method: MethodDescriptor, namespace: str) -> Any:
    """The method's request message aimed at `namespace` (wherever that message keeps it)."""
    message = message_factory.GetMessageClass(method.input_type)()
    fields = method.input_type.fields_by_name
    if "namespace" in fields:
        message.namespace = namespace
    elif "object_json" in fields:
        message.object_json = json.dumps({"metadata": {"name": "p", "namespace": namespace}})
    elif "target" in fields:
        message.target.namespace = namespace
    elif "start" in fields:
        message.start.target.namespace = namespace
    elif "header" in fields:
        message.header.target.namespace = namespace
    else:
        raise AssertionError(f"{method.name}: where does its namespace go?")
    return message


def _reply(method: MethodDescriptor) -> Any:
    return message_factory.GetMessageClass(method.output_type)()


def _handler(method: MethodDescriptor) -> grpc.RpcMethodHandler[Any, Any]:
    request_cls = message_factory.GetMessageClass(method.input_type)
    kwargs = {
        "request_deserializer": request_cls.FromString,
        "response_serializer": lambda m: m.SerializeToString(),
    }
    if method.client_streaming and method.server_streaming:

        async def ss(requests: AsyncIterator[Any], _ctx: Any) -> Any:
            async for _ in requests:
                pass
            yield _reply(method)

        return grpc.stream_stream_rpc_method_handler(ss, **kwargs)
    if method.client_streaming:

        async def su(requests: AsyncIterator[Any], _ctx: Any) -> Any:
            async for _ in requests:
                pass
            return _reply(method)

        return grpc.stream_unary_rpc_method_handler(su, **kwargs)
    if method.server_streaming:

        async def us(_request: Any, _ctx: Any) -> Any:
            yield _reply(method)

        return grpc.unary_stream_rpc_method_handler(us, **kwargs)

    async def uu(_request: Any, _ctx: Any) -> Any:
        return _reply(method)

    return grpc.unary_unary_rpc_method_handler(uu, **kwargs)


@pytest.fixture
async def served() -> AsyncIterator[tuple[grpc.aio.Channel, FakeIdentities]]:
    identities = FakeIdentities()
    server = grpc.aio.server(interceptors=[AccessControl(ADMIN, identities, identities)])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE.full_name, {m.name: _handler(m) for m in METHODS}
            )
        ]
    )
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, identities
    finally:
        await channel.close(None)
        await server.stop(None)


async def call(
    channel: grpc.aio.Channel, method: MethodDescriptor, request: Any, token: str
) -> None:
    path = f"/{SERVICE.full_name}/{method.name}"
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    ser = {"request_serializer": lambda m: m.SerializeToString(), "response_deserializer": bytes}
    if method.client_streaming:

        async def one() -> AsyncIterator[Any]:
            yield request

        if method.server_streaming:
            async for _ in channel.stream_stream(path, **ser)(one(), metadata=metadata, timeout=10):
                pass
        else:
            await channel.stream_unary(path, **ser)(one(), metadata=metadata, timeout=10)
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, **ser)(request, metadata=metadata, timeout=10):
            pass
    else:
        await channel.unary_unary(path, **ser)(request, metadata=metadata, timeout=10)


def test_every_rpc_has_an_access_rule() -> None:
    assert sorted(RPC_ACCESS) == sorted(m.name for m in METHODS)
    for method in METHODS:
        access = access_of(method.name, request_in(method, "team-x"))
        assert access is not None and access.namespace == "team-x", method.name
    # List without a namespace is every namespace; pools are their own resource.
    assert access_of("List", fastpath_pb2.ListRequest()) == Access("list", "sandboxes", "")
    events = fastpath_pb2.EventsRequest(namespace="n", kind="SandboxPool")
    assert access_of("ListEvents", events) == Access("get", "sandboxpools", "n")


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@pytest.mark.parametrize(
    ("token", "namespace", "code"),
    [
        ("", "team-a", grpc.StatusCode.UNAUTHENTICATED),
        ("wrong", "team-a", grpc.StatusCode.UNAUTHENTICATED),
        ("tok-a", "team-b", grpc.StatusCode.PERMISSION_DENIED),
        ("tok-a", "team-a", grpc.StatusCode.OK),
        (ADMIN, "team-b", grpc.StatusCode.OK),
    ],
    ids=["no-token", "wrong-token", "other-namespace", "right-namespace", "admin"],
)
async def test_rpc_by_credential(
    served: tuple[grpc.aio.Channel, FakeIdentities],
    method: MethodDescriptor,
    token: str,
    namespace: str,
    code: grpc.StatusCode,
) -> None:
    channel, identities = served
    try:
        await call(channel, method, request_in(method, namespace), token)
        got = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        got = exc.code()
        if code is grpc.StatusCode.PERMISSION_DENIED:
            assert f"alice may not {RPC_ACCESS[method.name][0]}" in (exc.details() or "")
            assert f"in namespace {namespace}" in (exc.details() or "")
    assert got is code
    if token == "tok-a":
        assert [a.namespace for a in identities.asked] == [namespace]
    else:
        assert identities.asked == []  # no review for the admin, nor for the unauthenticated
