"""Limits (minimums, pool defaults and maximum, what reaches the agent), leases (renew, lapse,
through a control-plane restart over the same store) and pulledMs, over the in-process fakes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from pydantic import ValidationError

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc
from fastsandbox.api.models import (
    DEFAULT_LOG_MAX_BYTES,
    ObjectMeta,
    PoolCapacity,
    Sandbox,
    SandboxLimits,
    SandboxPool,
    SandboxPoolSpec,
    SandboxResources,
    SandboxSpec,
    describe_validation_error,
)
from fastsandbox.api.quantity import cpu_millis, memory_bytes
from fastsandbox.control.fastpath.auth import TokenAuth
from fastsandbox.control.limits import DEFAULT_PIDS, effective_limits, server_defaults
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.errors import InvalidArgument, NotFound
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.store.memory import MemoryStore
from tests.unit.test_control_plane import IMG, TOKEN, Plane, auth, eventually, free_port

# -- the models' minimums ------------------------------------------------------------------


def _spec_error(resources: dict[str, object]) -> str:
    with pytest.raises(ValidationError) as info:
        SandboxSpec.model_validate({"image": IMG, "poolRef": "p", "resources": resources})
    return describe_validation_error(info.value, "spec")


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"memory": "0"}, "spec.resources.memory"),
        ({"memory": "1Ki"}, "spec.resources.memory"),
        ({"memory": "-1Gi"}, "spec.resources.memory"),
        ({"memory": "100m"}, "spec.resources.memory"),
        ({"cpu": "0"}, "spec.resources.cpu"),
        ({"cpu": "0.0001"}, "spec.resources.cpu"),
        ({"cpu": "9m"}, "spec.resources.cpu"),
        ({"cpu": "-1"}, "spec.resources.cpu"),
        ({"pids": 0}, "spec.resources.pids"),
        ({"pids": -5}, "spec.resources.pids"),
        ({"pids": 7}, "spec.resources.pids"),
        ({"disk": "0"}, "spec.resources.disk"),
    ],
)
def test_zero_negative_or_tiny_limits_are_refused_naming_the_field(
    resources: dict[str, object], field: str
) -> None:
    message = _spec_error(resources)
    assert message.startswith(f"{field}: "), message


def test_the_minimums_themselves_are_accepted() -> None:
    spec = SandboxSpec.model_validate(
        {
            "image": IMG,
            "poolRef": "p",
            "resources": {"cpu": "10m", "memory": "6Mi", "pids": 8, "disk": "1Mi"},
        }
    )
    assert spec.resources.pids == 8


def test_exact_parsing_does_not_truncate_to_zero() -> None:
    assert cpu_millis("0.5") == 500 and cpu_millis("250m") == 250 and cpu_millis("2") == 2000
    assert memory_bytes("1.5Ki") == 1536 and memory_bytes("1G") == 10**9


def test_pool_defaults_above_its_max_are_refused_naming_both() -> None:
    with pytest.raises(ValidationError) as info:
        SandboxPoolSpec.model_validate(
            {"sandboxDefaults": {"memory": "2Gi"}, "sandboxMax": {"memory": "1Gi"}}
        )
    message = describe_validation_error(info.value)
    assert "sandboxDefaults.memory" in message and "sandboxMax.memory" in message


def test_lease_seconds_must_be_positive() -> None:
    with pytest.raises(ValidationError) as info:
        SandboxSpec.model_validate({"image": IMG, "poolRef": "p", "leaseSeconds": 0})
    assert describe_validation_error(info.value, "spec").startswith("spec.leaseSeconds: ")


# -- effective limits ----------------------------------------------------------------------

FALLBACK = server_defaults("1", "512Mi")


def test_unset_limits_take_the_pool_defaults_then_the_servers() -> None:
    pool = SandboxPoolSpec(sandbox_defaults=SandboxLimits(memory="128Mi", log_max_bytes=65536))
    got = effective_limits(SandboxResources(), pool, FALLBACK)
    assert got.memory_bytes == 128 << 20
    assert got.cpu_millis == 1000  # the server's
    assert got.pids == DEFAULT_PIDS
    assert got.log_max_bytes == 65536
    assert got.disk_bytes == 1 << 30  # the server's default: there is no "no limit"
    assert effective_limits(SandboxResources(disk="64Mi"), pool, FALLBACK).disk_bytes == 64 << 20
    pooled = SandboxPoolSpec(sandbox_defaults=SandboxLimits(disk="2Gi"))
    assert effective_limits(SandboxResources(), pooled, FALLBACK).disk_bytes == 2 << 30
    plain = effective_limits(SandboxResources(), None, FALLBACK)
    assert plain.log_max_bytes == DEFAULT_LOG_MAX_BYTES and plain.memory_bytes == 512 << 20


def test_a_limit_above_the_pool_max_is_refused_naming_both() -> None:
    pool = SandboxPoolSpec(sandbox_max=SandboxLimits(memory="1Gi", pids=100))
    with pytest.raises(InvalidArgument) as info:
        effective_limits(SandboxResources(memory="2Gi"), pool, FALLBACK)
    assert "spec.resources.memory" in info.value.message
    assert "sandboxMax.memory (1Gi)" in info.value.message
    with pytest.raises(InvalidArgument, match=r"spec.resources.pids.*sandboxMax.pids"):
        effective_limits(SandboxResources(pids=101), pool, FALLBACK)
    assert effective_limits(SandboxResources(memory="1Gi"), pool, FALLBACK).memory_bytes == 1 << 30


def test_a_server_default_above_the_pool_max_becomes_the_max() -> None:
    pool = SandboxPoolSpec(sandbox_max=SandboxLimits(memory="256Mi", cpu="500m"))
    got = effective_limits(SandboxResources(), pool, FALLBACK)
    assert got.memory_bytes == 256 << 20 and got.cpu_millis == 500


# -- through the Fast-Path, to the agent ---------------------------------------------------


async def _pool(store: MemoryStore, **spec: object) -> None:
    await store.create(
        SandboxPool(
            metadata=ObjectMeta(name="p"),
            spec=SandboxPoolSpec(
                capacity=PoolCapacity(pool_min=1, pool_max=1),
                max_sandboxes_per_agent=4,
                **spec,  # type: ignore[arg-type]
            ),
        )
    )


class _Harness:
    def __init__(self, store: MemoryStore, fleet: InProcessFleet) -> None:
        self.store, self.fleet = store, fleet
        self.cp: ControlPlane | None = None
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> Plane:
        self.cp = ControlPlane(
            self.store,
            self.fleet,
            PlaneSettings(delete_grace_seconds=0, heartbeat_seconds=0.1),
        )
        await self.cp.start()
        self.server = grpc.aio.server(interceptors=[TokenAuth(TOKEN)])
        fastpath_pb2_grpc.add_FastPathServicer_to_server(self.cp.servicer, self.server)  # type: ignore[no-untyped-call]
        port = self.server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = fastpath_pb2_grpc.FastPathStub(self.channel)
        return Plane(self.cp, self.store, self.fleet, stub, self.channel)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(0)
        if self.cp is not None:
            await self.cp.close()
        self.cp = self.server = self.channel = None


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[_Harness]:
    store = MemoryStore(bookmark_interval=0.5)
    await _pool(
        store,
        sandbox_defaults=SandboxLimits(memory="64Mi", pids=64, log_max_bytes=1 << 20),
        sandbox_max=SandboxLimits(memory="1Gi", cpu="2"),
    )
    h = _Harness(store, InProcessFleet(tmp_path))
    try:
        yield h
    finally:
        await h.stop()
        await store.close()


def _agent_spec(plane: Plane, reply: fastpath_pb2.CreateResponse) -> object:
    return plane.fleet.runtime(reply.agent).specs[reply.container_id]


async def test_limits_reach_the_agent_with_pool_defaults(harness: _Harness) -> None:
    plane = await harness.start()
    reply = await plane.create(
        "lim", resources=fastpath_pb2.Resources(cpu="250m", pids=32), lease_seconds=0
    )
    spec = plane.fleet.runtime(reply.agent).specs[reply.container_id]
    assert spec.cpu_millis == 250
    assert spec.pids_limit == 32
    assert spec.memory_bytes == 64 << 20  # the pool's default
    # The first create on this agent had to fetch the image: the agent measured it.
    assert reply.timings.pulled_ms > 0
    again = await plane.create("lim2")
    assert again.timings.pulled_ms == 0  # cached now


async def test_over_the_max_or_under_the_minimum_is_refused_and_nothing_is_made(
    harness: _Harness,
) -> None:
    plane = await harness.start()
    for resources, field in (
        (fastpath_pb2.Resources(memory="2Gi"), "sandboxMax.memory"),
        (fastpath_pb2.Resources(memory="0"), "spec.resources.memory"),
        (fastpath_pb2.Resources(cpu="0.0001"), "spec.resources.cpu"),
        (fastpath_pb2.Resources(pids=-1), "spec.resources.pids"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await plane.create("bad", resources=resources)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert field in (info.value.details() or "")
    with pytest.raises(NotFound):
        await plane.store.get(Sandbox, "default", "bad")
    assert plane.plane.registry.pool_slots("default", "p")[1] == 0


# -- leases --------------------------------------------------------------------------------


async def _renew(plane: Plane, name: str) -> fastpath_pb2.RenewLeaseReply:
    reply: fastpath_pb2.RenewLeaseReply = await plane.stub.RenewLease(
        fastpath_pb2.RenewLeaseRequest(name=name), metadata=auth()
    )
    return reply


async def _gone(plane: Plane, name: str) -> bool:
    try:
        await plane.store.get(Sandbox, "default", name)
    except NotFound:
        return True
    return False


async def test_a_renewed_lease_keeps_the_sandbox_and_a_lapsed_one_deletes_it(
    harness: _Harness,
) -> None:
    plane = await harness.start()
    reply = await plane.create("leased", lease_seconds=2)
    runtime = plane.fleet.runtime(reply.agent)
    created = await plane.store.get(Sandbox, "default", "leased")
    assert created.status.lease_expire_time is not None  # persisted from the start
    # Renewed for longer than the lease (so only the renewals keep it), each renewal well
    # inside it: a renewal slowed by a loaded machine still comes long before the lapse.
    renewing_until = time.monotonic() + 3
    while time.monotonic() < renewing_until:
        answer = await _renew(plane, "leased")
        assert answer.lease_expire_time.endswith("Z")
        await asyncio.sleep(0.3)
    assert not await _gone(plane, "leased")
    sb = await plane.store.get(Sandbox, "default", "leased")
    assert sb.status.lease_expire_time is not None
    # Stop renewing: deleted (record and container), not kept as Expired.
    await eventually(lambda: _gone(plane, "leased"), timeout=10)
    assert reply.container_id in runtime.delete_graces
    assert plane.plane.registry.holder(reply.container_id) is None
    # Gone: NOT_FOUND.
    assert await plane.code_of(_renew(plane, "leased")) is grpc.StatusCode.NOT_FOUND


async def test_renewing_without_a_lease_is_a_failed_precondition(harness: _Harness) -> None:
    plane = await harness.start()
    await plane.create("plain")
    assert await plane.code_of(_renew(plane, "plain")) is grpc.StatusCode.FAILED_PRECONDITION
    assert await plane.code_of(_renew(plane, "nope")) is grpc.StatusCode.NOT_FOUND


async def test_a_lease_lapses_through_a_control_plane_restart(harness: _Harness) -> None:
    plane = await harness.start()
    await plane.create("survivor", lease_seconds=2)
    await _renew(plane, "survivor")
    await harness.stop()  # nobody watches the lease now
    plane = await harness.start()  # a new control plane over the same store and agents
    assert not await _gone(plane, "survivor")
    await eventually(lambda: _gone(plane, "survivor"), timeout=10)


async def test_a_declarative_record_above_the_pool_max_is_not_started(harness: _Harness) -> None:
    plane = await harness.start()
    await plane.store.create(
        Sandbox(
            metadata=ObjectMeta(name="declared"),
            spec=SandboxSpec(image=IMG, pool_ref="p", resources=SandboxResources(memory="2Gi")),
        )
    )

    async def refused() -> bool:
        sb = await plane.store.get(Sandbox, "default", "declared")
        return any(
            c.type == "Scheduled" and c.reason == "InvalidSpec" for c in sb.status.conditions
        )

    await eventually(refused)
    sb = await plane.store.get(Sandbox, "default", "declared")
    assert "sandboxMax.memory" in sb.status.message
    assert not sb.status.container_id
    assert plane.plane.registry.pool_slots("default", "p")[1] == 0


def test_the_sdk_request_carries_lease_and_every_limit() -> None:
    from fastsandbox.sdk._core import create_request

    req = create_request(
        "default",
        "r",
        IMG,
        {"lease": 30, "resources": {"cpu": "250m", "memory": "64Mi", "pids": 64, "disk": "1Gi"}},
    )
    assert req.lease_seconds == 30
    assert (req.resources.cpu, req.resources.memory) == ("250m", "64Mi")
    assert (req.resources.pids, req.resources.disk) == (64, "1Gi")
    with pytest.raises(InvalidArgument, match=r"spec.resources.pids"):
        create_request("default", "r", IMG, {"resources": {"pids": 0}})
    with pytest.raises(InvalidArgument, match=r"spec.leaseSeconds"):
        create_request("default", "r", IMG, {"lease": 0})
