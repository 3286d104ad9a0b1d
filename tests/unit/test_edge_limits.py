"""Limits at the Fast-Path's edge: request sizes (INVALID_ARGUMENT naming the field and limit),
the per-credential token bucket (RESOURCE_EXHAUSTED + `retry-after`, read by the SDK), the
per-credential stream cap, and the server's max message size — over a real gRPC server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc
from fastsandbox.api.models import ObjectMeta, PoolCapacity, SandboxPool, SandboxPoolSpec
from fastsandbox.control.fastpath.access import AccessGuard
from fastsandbox.control.fastpath.authz import NamespaceAuthorizer, TokenAuthenticator
from fastsandbox.control.fastpath.serve import start_fastpath
from fastsandbox.control.fastpath.service import sandbox_from_request
from fastsandbox.control.fastpath.throttle import Limiter, credential_key
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.control.tokens import MemoryTokenStore
from fastsandbox.errors import RETRY_AFTER_KEY, CapacityExhausted, InvalidArgument
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.sdk._core import translate
from fastsandbox.settings import (
    MAX_ARGS_BYTES,
    MAX_ENV_BYTES,
    MAX_ENV_VARS,
    MAX_LABEL_KEY_BYTES,
    MAX_LABEL_VALUE_BYTES,
    MAX_LABELS,
    EdgeLimits,
)
from fastsandbox.store.memory import MemoryStore

TOKEN = "edge-token"
IMG = "busybox"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the bucket ----------------------------------------------------------------------------


def test_bucket_grants_the_burst_then_names_the_wait_and_refills() -> None:
    clock = Clock()
    limiter = Limiter(EdgeLimits(rate_per_second=2, rate_burst=3), clock)
    assert [limiter.admit("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.admit("a") == pytest.approx(0.5)  # one token at 2/s
    assert limiter.admit("b") == 0.0  # another credential has its own bucket
    clock.now += 0.5
    assert limiter.admit("a") == 0.0
    assert limiter.admit("a") > 0


def test_limits_cannot_be_switched_off_by_a_zero() -> None:
    for bad in (
        EdgeLimits(rate_per_second=0),
        EdgeLimits(rate_burst=0),
        EdgeLimits(max_streams=0),
    ):
        with pytest.raises(ValueError, match="positive"):
            Limiter(bad)


def test_full_buckets_are_pruned_so_random_tokens_cannot_grow_the_table() -> None:
    clock = Clock()
    limiter = Limiter(EdgeLimits(rate_per_second=1000, rate_burst=1), clock)
    for i in range(10_000):
        limiter.admit(f"k{i}")
        clock.now += 0.01
    assert len(limiter._buckets) <= 4096


def test_stream_slots_are_counted_per_credential() -> None:
    limiter = Limiter(EdgeLimits(max_streams=2))
    assert limiter.open_stream("a") and limiter.open_stream("a")
    assert not limiter.open_stream("a")
    assert limiter.open_stream("b")
    limiter.close_stream("a")
    assert limiter.open_stream("a")


def test_the_key_is_a_hash_of_the_credential_never_the_token() -> None:
    key = credential_key((("authorization", f"Bearer {TOKEN}"),))
    assert TOKEN not in key and len(key) == 24
    assert key != credential_key((("authorization", "Bearer other"),))
    assert credential_key(()) == ""


# -- request sizes -------------------------------------------------------------------------


def _create(**kw: object) -> fastpath_pb2.CreateRequest:
    return fastpath_pb2.CreateRequest(name="s", image=IMG, pool_ref="p", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_kw", "field", "limit"),
    [
        (
            {"env": [fastpath_pb2.EnvVar(name=f"V{i}") for i in range(MAX_ENV_VARS + 1)]},
            "spec.env",
            MAX_ENV_VARS,
        ),
        ({"env": [fastpath_pb2.EnvVar(name="V", value="x" * MAX_ENV_BYTES)]},
         "spec.env", MAX_ENV_BYTES),
        ({"args": ["y" * MAX_ARGS_BYTES]}, "spec.command + spec.args", MAX_ARGS_BYTES),
        ({"labels": {f"k{i}": "v" for i in range(MAX_LABELS + 1)}}, "metadata.labels", MAX_LABELS),
        ({"labels": {"k" * (MAX_LABEL_KEY_BYTES + 1): "v"}},
         "metadata.labels", MAX_LABEL_KEY_BYTES),
        ({"labels": {"k": "v" * (MAX_LABEL_VALUE_BYTES + 1)}},
         "metadata.labels", MAX_LABEL_VALUE_BYTES),
    ],
)  # fmt: skip
def test_oversized_requests_are_refused_naming_the_field_and_limit(
    request_kw: dict[str, object], field: str, limit: int
) -> None:
    with pytest.raises(InvalidArgument) as info:
        sandbox_from_request(_create(**request_kw))
    assert info.value.message.startswith(field)
    assert f"at most {limit}" in info.value.message


def test_requests_at_the_limits_pass() -> None:
    sandbox_from_request(
        _create(
            env=[fastpath_pb2.EnvVar(name=f"V{i}") for i in range(MAX_ENV_VARS)],
            labels={f"k{i}": "v" * MAX_LABEL_VALUE_BYTES for i in range(MAX_LABELS)},
        )
    )


# -- over gRPC -----------------------------------------------------------------------------


@dataclass
class Edge:
    stub: fastpath_pb2_grpc.FastPathStub
    endpoint: str
    fleet: InProcessFleet


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
async def edge(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Edge]:
    limits: EdgeLimits = request.param
    store = MemoryStore()
    await store.create(
        SandboxPool(
            metadata=ObjectMeta(name="p"),
            spec=SandboxPoolSpec(
                capacity=PoolCapacity(pool_min=1, pool_max=1), max_sandboxes_per_agent=4
            ),
        )
    )
    fleet = InProcessFleet(tmp_path)
    cp = ControlPlane(store, fleet, PlaneSettings(delete_grace_seconds=0, heartbeat_seconds=0.1))
    await cp.start()
    endpoint = f"127.0.0.1:{_port()}"
    guard = AccessGuard(TokenAuthenticator(TOKEN, MemoryTokenStore()), NamespaceAuthorizer())
    server = await start_fastpath(cp.servicer, guard, endpoint, None, limits)
    channel = grpc.aio.insecure_channel(endpoint)
    try:
        yield Edge(fastpath_pb2_grpc.FastPathStub(channel), endpoint, fleet)  # type: ignore[no-untyped-call]
    finally:
        await channel.close()
        await server.stop(0)
        await cp.close()
        await store.close()


@pytest.mark.parametrize("edge", [EdgeLimits(rate_per_second=0.001, rate_burst=2)], indirect=True)
async def test_over_the_rate_is_resource_exhausted_with_a_retry_hint(edge: Edge) -> None:
    ref = fastpath_pb2.ListRequest(namespace="default")
    await edge.stub.List(ref, metadata=AUTH)
    await edge.stub.List(ref, metadata=AUTH)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await edge.stub.List(ref, metadata=AUTH)
    err = info.value
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "0.001 calls/s per token" in (err.details() or "")
    trailing = dict(err.trailing_metadata() or ())
    assert float(trailing[RETRY_AFTER_KEY]) > 0
    # What the SDK (and so the CLI, which prints the message) makes of it.
    translated = translate(err, edge.endpoint)
    assert isinstance(translated, CapacityExhausted)
    # The SDK carries the server's hint as it was sent.
    assert translated.retry_after == float(trailing[RETRY_AFTER_KEY])
    assert "retry after" in translated.message
    # Another credential is not held back by this one (refused by the token check instead).
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await edge.stub.List(ref, metadata=(("authorization", "Bearer someone-else"),))
    assert other.value.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("edge", [EdgeLimits(max_streams=1)], indirect=True)
async def test_concurrent_streams_per_credential_are_capped(edge: Edge) -> None:
    await edge.stub.Create(_create(command=["sleep", "60"]), metadata=AUTH)
    (agent,) = edge.fleet.started
    runtime = edge.fleet.runtime(agent)
    (container_id,) = runtime.specs
    runtime.write_log(container_id, b"ready\n")
    logs = fastpath_pb2.LogsRequest(namespace="default", name="s", follow=True)
    first = edge.stub.Logs(logs, metadata=AUTH)
    # Its first chunk proves the server holds the stream open (and so counts it); polling for
    # a refusal instead raced the first call's start on a loaded machine.
    chunk = await asyncio.wait_for(first.read(), 30)
    assert isinstance(chunk, fastpath_pb2.LogChunk) and chunk.data == b"ready\n"
    once = fastpath_pb2.LogsRequest(namespace="default", name="s")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in edge.stub.Logs(once, metadata=AUTH):
            pass
    refused = info.value
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 1" in (refused.details() or "")
    first.cancel()
    # The slot is given back when the stream ends.
    for _ in range(100):
        third = edge.stub.Logs(
            fastpath_pb2.LogsRequest(namespace="default", name="s"), metadata=AUTH
        )
        try:
            async for _ in third:
                pass
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the stream slot was never given back")


@pytest.mark.parametrize("edge", [EdgeLimits(max_message_bytes=64 * 1024)], indirect=True)
async def test_an_oversized_message_is_refused_naming_the_limit(edge: Edge) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await edge.stub.Create(_create(args=["z" * 100_000]), metadata=AUTH)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "65536" in (info.value.details() or "")
