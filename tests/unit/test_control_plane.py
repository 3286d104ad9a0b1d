"""The control plane over fakes at its seams: MemoryStore, and agents that are the real agent
gRPC server + SandboxManager over FakeRuntime (InProcessFleet). The Fast-Path is served by a real
grpc.aio server on loopback with token auth; requests go through the generated stub."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from fastsandbox.agent.runtime.base import ContainerSpec, ContainerState, ContainerStatus
from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc
from fastsandbox.api.labels import CLEANUP_FINALIZER
from fastsandbox.api.models import (
    NetworkMode,
    ObjectMeta,
    PoolCapacity,
    Sandbox,
    SandboxPhase,
    SandboxPool,
    SandboxPoolSpec,
    SandboxSpec,
)
from fastsandbox.control.create_request import CreateOptions
from fastsandbox.control.fastpath.auth import TokenAuth
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.errors import NotFound
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.store.memory import MemoryStore

TOKEN = "test-token"
IMG = "127.0.0.1:5000/busybox:latest"


@dataclass
class Plane:
    plane: ControlPlane
    store: MemoryStore
    fleet: InProcessFleet
    stub: fastpath_pb2_grpc.FastPathStub
    channel: grpc.aio.Channel

    async def create(self, name: str, **kw: object) -> fastpath_pb2.CreateResponse:
        fields: dict[str, object] = {"name": name, "image": IMG, "pool_ref": "p"}
        fields.update(kw)
        reply: fastpath_pb2.CreateResponse = await self.stub.Create(
            fastpath_pb2.CreateRequest(**fields), metadata=auth()
        )
        return reply

    async def code_of(self, call: Awaitable[object]) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        return info.value.code()


def auth(token: str = TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def make_pool(
    store: MemoryStore,
    name: str,
    *,
    agents: int,
    per_agent: int,
    network_mode: NetworkMode = NetworkMode.PRIVATE,
) -> None:
    await store.create(
        SandboxPool(
            metadata=ObjectMeta(name=name),
            spec=SandboxPoolSpec(
                capacity=PoolCapacity(pool_min=agents, pool_max=agents),
                max_sandboxes_per_agent=per_agent,
                network_mode=network_mode,
            ),
        )
    )


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    store = MemoryStore(bookmark_interval=0.5)
    await make_pool(store, "p", agents=2, per_agent=2)
    fleet = InProcessFleet(tmp_path)
    cp = ControlPlane(store, fleet, PlaneSettings(delete_grace_seconds=0, heartbeat_seconds=0.1))
    await cp.start()
    server = grpc.aio.server(interceptors=[TokenAuth(TOKEN)])
    fastpath_pb2_grpc.add_FastPathServicer_to_server(cp.servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Plane(cp, store, fleet, fastpath_pb2_grpc.FastPathStub(channel), channel)  # type: ignore[no-untyped-call]
    finally:
        await channel.close()
        await server.stop(0)
        await cp.close()
        await store.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def _stored(store: MemoryStore, name: str) -> bool:
    try:
        await store.get(Sandbox, "default", name)
    except NotFound:
        return False
    return True


async def test_fast_create_runs_on_an_agent_and_stores_the_record(plane: Plane) -> None:
    reply = await plane.create(
        "s1",
        command=["sh", "-c"],
        args=["echo $V"],
        env=[fastpath_pb2.EnvVar(name="V", value="x")],
        working_dir="/tmp",
        exposed_ports=[8080],
    )
    assert reply.phase == "Running"
    assert reply.endpoints == [f"{reply.agent_ip}:8080"]
    t = reply.timings
    assert 0 <= t.accepted_ms <= t.scheduled_ms <= t.runtime_ready_ms

    # Fast mode answers first and stores right after.
    await eventually(lambda: _stored(plane.store, "s1"))
    stored = await plane.store.get(Sandbox, "default", "s1")
    assert stored.metadata.uid == reply.uid
    assert stored.status.container_id == reply.container_id
    assert CLEANUP_FINALIZER in stored.metadata.finalizers
    spec = plane.fleet.runtime(reply.agent).specs[reply.container_id]
    assert spec.command == ("sh", "-c") and spec.args == ("echo $V",)
    assert ("V", "x") in spec.env and spec.working_dir == "/tmp"
    assert spec.memory_bytes == 512 * 1024**2  # default limit: nothing runs unbounded
    assert json.loads(reply.object_json)["status"]["containerID"] == reply.container_id


async def test_duplicate_name_is_already_exists(plane: Plane) -> None:
    await plane.create("dup")
    assert await plane.code_of(plane.create("dup")) == grpc.StatusCode.ALREADY_EXISTS


async def test_validation_names_the_field(plane: Plane) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await plane.create("v", image="")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.image: required" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await plane.create("v", exposed_ports=[65536])
    assert "spec.exposedPorts[0]: must be 1..65535" in (info.value.details() or "")
    with pytest.raises(NotFound):
        await plane.store.get(Sandbox, "default", "v")


async def test_unknown_pool_is_not_found(plane: Plane) -> None:
    assert await plane.code_of(plane.create("x", pool_ref="nope")) == grpc.StatusCode.NOT_FOUND


async def test_capacity_exhausted_then_freed_by_delete(plane: Plane) -> None:
    for i in range(4):
        await plane.create(f"c{i}")
    code = await plane.code_of(plane.create("c4"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    strong = plane.create("c4", mode="strong")
    assert await plane.code_of(strong) == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(NotFound):  # the Strong record that could not be placed is gone
        await plane.store.get(Sandbox, "default", "c4")
    await plane.stub.Delete(fastpath_pb2.DeleteRequest(name="c0", wait=True), metadata=auth())
    with pytest.raises(NotFound):
        await plane.store.get(Sandbox, "default", "c0")
    assert (await plane.create("c4")).phase == "Running"


async def test_same_port_goes_to_another_agent_in_a_shared_network(plane: Plane) -> None:
    pool = await plane.store.get(SandboxPool, "default", "p")
    pool.spec.network_mode = NetworkMode.SHARED
    await plane.store.update(pool)
    a = await plane.create("pa", exposed_ports=[8080])
    b = await plane.create("pb", exposed_ports=[8080])
    assert a.agent != b.agent
    code = await plane.code_of(plane.create("pc", exposed_ports=[8080]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_placement_keeps_ports_exclusive_only_in_a_shared_network(plane: Plane) -> None:
    """Private sandboxes publish each on a host port of its own: placement does not spread them
    by port (the registry's rule itself: tests/unit/test_placement_index.py). The in-process
    agents share one network (a fake runtime has no namespaces), so each agent would refuse a
    second 8080 on its own: what is checked here is what the plane asks placement for."""
    registry = plane.plane.registry
    asked: list[bool] = []
    allocate = registry.allocate

    def spy(**kwargs: Any) -> Any:
        asked.append(kwargs["exclusive_ports"])
        return allocate(**kwargs)

    registry.allocate = spy  # type: ignore[method-assign]
    assert (await plane.create("q0", exposed_ports=[8080])).phase == "Running"
    pool = await plane.store.get(SandboxPool, "default", "p")
    pool.spec.network_mode = NetworkMode.SHARED
    await plane.store.update(pool)
    assert (await plane.create("q1", exposed_ports=[8081])).phase == "Running"
    assert asked == [False, True]


async def test_strong_mode_stores_pending_first(plane: Plane) -> None:
    seen: list[str] = []

    async def watch() -> None:
        async for event in plane.store.watch(Sandbox, "0"):
            if event.object is not None and event.object.metadata.name == "st":
                assert isinstance(event.object, Sandbox)
                seen.append(f"{event.type.value}:{event.object.status.phase.value}")

    watcher = asyncio.create_task(watch())
    reply = await plane.create("st", mode="strong")
    assert reply.phase == "Running"
    await eventually(lambda: asyncio.sleep(0, result=len(seen) >= 2))
    watcher.cancel()
    assert seen[:2] == ["ADDED:Pending", "MODIFIED:Running"]


async def test_idempotency_key(plane: Plane) -> None:
    first = await plane.create("i1", idempotency_key="k", ttl_seconds=60)
    again = await plane.create("i1", idempotency_key="k", ttl_seconds=60)
    assert again.uid == first.uid and again.container_id == first.container_id
    other = plane.create("i1", idempotency_key="k", image="other:1", ttl_seconds=60)
    assert await plane.code_of(other) == grpc.StatusCode.ALREADY_EXISTS


async def test_delete_without_wait_is_finished_by_the_reconciler(plane: Plane) -> None:
    reply = await plane.create("bg")
    answer = await plane.stub.Delete(fastpath_pb2.DeleteRequest(name="bg"), metadata=auth())
    assert answer.phase == "Terminating"

    async def gone() -> bool:
        try:
            await plane.store.get(Sandbox, "default", "bg")
        except NotFound:
            return True
        return False

    await eventually(gone)
    assert plane.plane.registry.holder(reply.container_id) is None
    runtime = plane.fleet.runtime(reply.agent)
    assert reply.container_id in runtime.delete_graces


async def test_declarative_record_converges_to_running(plane: Plane) -> None:
    await plane.store.create(
        Sandbox(metadata=ObjectMeta(name="decl"), spec=SandboxSpec(image=IMG, pool_ref="p"))
    )

    async def running() -> bool:
        sb = await plane.store.get(Sandbox, "default", "decl")
        return sb.status.phase is SandboxPhase.RUNNING and bool(sb.status.container_id)

    await eventually(running)
    sb = await plane.store.get(Sandbox, "default", "decl")
    assert CLEANUP_FINALIZER in sb.metadata.finalizers


async def test_namespace_isolation_for_declarative_records(plane: Plane) -> None:
    await plane.store.create(
        Sandbox(
            metadata=ObjectMeta(name="x", namespace="other"),
            spec=SandboxSpec(image=IMG, pool_ref="p"),
        )
    )
    await asyncio.sleep(0.5)
    sb = await plane.store.get(Sandbox, "other", "x")
    assert not sb.status.assigned_agent
    assert sb.status.phase is SandboxPhase.PENDING


async def test_pool_with_sandboxes_cannot_be_deleted(plane: Plane) -> None:
    await plane.create("keep")
    call = plane.stub.DeletePool(fastpath_pb2.ObjectRef(name="p"), metadata=auth())
    assert await plane.code_of(call) == grpc.StatusCode.ABORTED


async def test_token_is_required_on_every_call(plane: Plane) -> None:
    for md in ((), auth("wrong")):
        call = plane.stub.List(fastpath_pb2.ListRequest(), metadata=md)
        assert await plane.code_of(call) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in plane.stub.Logs(fastpath_pb2.LogsRequest(name="x"), metadata=md):
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_logs_stream_from_the_agent(plane: Plane) -> None:
    reply = await plane.create("lg")
    plane.fleet.runtime(reply.agent).write_log(reply.container_id, b"line-1\nline-2\n")
    chunks = [
        c.data async for c in plane.stub.Logs(fastpath_pb2.LogsRequest(name="lg"), metadata=auth())
    ]
    assert b"".join(chunks) == b"line-1\nline-2\n"


async def test_recovery_rebuilds_slots_from_records_and_agents(plane: Plane) -> None:
    made = [await plane.create(f"r{i}", exposed_ports=[9000 + i]) for i in range(3)]
    # A container the agent runs without any record (a Fast create that crashed before persist).
    agent = made[0].agent
    orphan_runtime = plane.fleet.runtime(agent)
    from fastsandbox.agent.runtime.base import ContainerSpec

    await orphan_runtime.pull(IMG)
    await orphan_runtime.create(
        ContainerSpec(
            id="orphan-1",
            image=IMG,
            log_path=str(plane.fleet.root / "orphan.log"),
            labels={
                "fastsandbox.io/agent": agent,
                "fastsandbox.io/sandbox-id": "orphan-1",
                "fastsandbox.io/ports": "7000",
            },
        )
    )
    fresh = ControlPlane(plane.store, plane.fleet, PlaneSettings(heartbeat_seconds=0.1))
    report = await fresh.start()
    try:
        assert report.slots_adopted == 3
        assert report.orphans == 1
        for reply in made:
            holder = fresh.registry.holder(reply.container_id)
            assert holder is not None and holder.name == reply.agent
        orphan_holder = fresh.registry.holder("orphan-1")
        assert orphan_holder is not None and 7000 in orphan_holder.ports_in_use
        total, allocated = fresh.registry.pool_slots("default", "p")
        assert (total, allocated) == (4, 4)
    finally:
        await fresh._tasks.close()


async def test_recovery_rebuilds_a_fast_create_whose_record_was_never_written(
    plane: Plane,
) -> None:
    # A Fast create that died between the agent's create and the record's write.
    service = plane.plane.sandboxes
    sb = Sandbox(
        metadata=ObjectMeta(name="crashed", uid="u-1", labels={"team": "a"}),
        spec=SandboxSpec(image=IMG, pool_ref="p", command=["sleep", "1"], exposed_ports=[7070]),
    )
    allocation = service._allocate(sb)
    await service._run_on_agent(sb, allocation)
    with pytest.raises(NotFound):
        await plane.store.get(Sandbox, "default", "crashed")

    fresh = ControlPlane(plane.store, plane.fleet, PlaneSettings(heartbeat_seconds=0.1))
    report = await fresh.start()
    try:
        assert report.records_rebuilt == 1 and report.orphans == 0
        rebuilt = await plane.store.get(Sandbox, "default", "crashed")
        assert rebuilt.status.phase is SandboxPhase.RUNNING
        assert rebuilt.status.container_id == allocation.sandbox_id
        assert rebuilt.metadata.uid == "u-1" and rebuilt.metadata.labels == {"team": "a"}
        assert rebuilt.spec.command == ["sleep", "1"]
        assert rebuilt.status.endpoints == [f"{allocation.ip}:7070"]
        assert CLEANUP_FINALIZER in rebuilt.metadata.finalizers
    finally:
        await fresh._tasks.close()


async def test_recovery_waits_for_a_create_left_in_flight_at_the_agent(plane: Plane) -> None:
    # The control plane died while the agent was still making a container for it: the create
    # finishes at the agent, and the next control plane's recovery waits for it, then rebuilds
    # its record (a record rebuilt earlier could claim a container that never runs).
    service = plane.plane.sandboxes
    sb = Sandbox(
        metadata=ObjectMeta(name="inflight", uid="u-2"),
        spec=SandboxSpec(image=IMG, pool_ref="p", command=["sleep", "1"]),
    )
    allocation = service._allocate(sb)
    runtime = plane.fleet.runtime(allocation.agent)
    entered, go = asyncio.Event(), asyncio.Event()
    create = runtime.create

    async def slow_create(spec: ContainerSpec) -> ContainerState:
        entered.set()
        await go.wait()
        return await create(spec)

    runtime.create = slow_create  # type: ignore[method-assign]
    client = plane.plane.clients.get(allocation.target)
    # The bare call, without the control plane's own cleanup: its process is gone mid-call.
    call = asyncio.create_task(client.create(service.runtime_spec(sb, allocation.sandbox_id)))
    await entered.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    fresh = ControlPlane(plane.store, plane.fleet, PlaneSettings(heartbeat_seconds=0.1))
    starting = asyncio.create_task(fresh.start())
    try:
        await asyncio.sleep(0.5)
        assert not starting.done(), "recovery did not wait for the create in flight"
        go.set()
        report = await starting
        assert report.records_rebuilt == 1 and report.orphans == 0
        rebuilt = await plane.store.get(Sandbox, "default", "inflight")
        assert rebuilt.status.phase is SandboxPhase.RUNNING
        assert rebuilt.status.container_id == allocation.sandbox_id
        state = await runtime.get(allocation.sandbox_id)
        assert state.status is ContainerStatus.RUNNING
    finally:
        go.set()
        await starting
        await fresh._tasks.close()


async def test_a_create_whose_caller_hangs_up_leaves_no_container(plane: Plane) -> None:
    # The agent finishes a create whatever happens to the call; the control plane, still alive,
    # takes the container back when its own caller is gone.
    service = plane.plane.sandboxes
    agents = plane.plane.registry.agents("default", "p")
    runtimes = [plane.fleet.runtime(a.name) for a in agents]
    entered, go = asyncio.Event(), asyncio.Event()
    for runtime in runtimes:
        create = runtime.create

        async def slow_create(spec: ContainerSpec, create: Any = create) -> ContainerState:
            entered.set()
            await go.wait()
            state: ContainerState = await create(spec)
            return state

        runtime.create = slow_create  # type: ignore[method-assign]
    sb = Sandbox(
        metadata=ObjectMeta(name="hangup"),
        spec=SandboxSpec(image=IMG, pool_ref="p", command=["sleep", "1"]),
    )
    call = asyncio.create_task(service.create(sb, CreateOptions()))
    await entered.wait()
    call.cancel()
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def gone() -> bool:
        listed = [s for r in runtimes for s in await r.list() if s.id.startswith("hangup-")]
        return not listed and all(not a.slots for a in agents)

    await eventually(gone)
    with pytest.raises(NotFound):
        await plane.store.get(Sandbox, "default", "hangup")
