"""A Create's "sandbox created" line, now written once the answer has left (so the caller does
not wait for its formatting), is still written once, with the sandbox, its agent and its time —
over a real gRPC server. That it comes after the reply is not asserted: only a timing could."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2_grpc
from fastsandbox.control.fastpath.access import AccessGuard
from fastsandbox.control.fastpath.authz import NamespaceAuthorizer, TokenAuthenticator
from fastsandbox.control.fastpath.serve import start_fastpath
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.control.tokens import MemoryTokenStore
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.sdk import _core
from fastsandbox.settings import EdgeLimits
from fastsandbox.store.memory import MemoryStore
from tests.unit.test_control_plane import make_pool
from tests.unit.test_edge_limits import AUTH, TOKEN, _port

SERVICE_LOGGER = "fastsandbox.control.fastpath.service"


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[fastpath_pb2_grpc.FastPathStub]:
    store = MemoryStore()
    await make_pool(store, "p", agents=1, per_agent=4)
    cp = ControlPlane(
        store,
        InProcessFleet(tmp_path),
        PlaneSettings(delete_grace_seconds=0, heartbeat_seconds=0.1),
    )
    await cp.start()
    endpoint = f"127.0.0.1:{_port()}"
    guard = AccessGuard(TokenAuthenticator(TOKEN, MemoryTokenStore()), NamespaceAuthorizer())
    server = await start_fastpath(cp.servicer, guard, endpoint, None, EdgeLimits())
    channel = grpc.aio.insecure_channel(endpoint)
    try:
        yield fastpath_pb2_grpc.FastPathStub(channel)  # type: ignore[no-untyped-call]
    finally:
        await channel.close()
        await server.stop(0)
        await cp.close()
        await store.close()


async def test_the_created_line_is_still_logged_once_with_its_fields(
    stub: fastpath_pb2_grpc.FastPathStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=SERVICE_LOGGER)
    request = _core.create_request("default", "logged", "busybox", {"pool": "p", "mode": "fast"})
    reply = await stub.Create(request, metadata=AUTH)
    assert reply.phase == "Running"
    for _ in range(200):
        lines = [r for r in caplog.records if r.getMessage() == "sandbox created"]
        if lines:
            break
        await asyncio.sleep(0.01)
    assert len(lines) == 1
    line = lines[0]
    assert getattr(line, "sandbox", None) == "default/logged"
    assert getattr(line, "agent", None) == reply.agent
    assert getattr(line, "ms", None) == pytest.approx(reply.timings.runtime_ready_ms)
