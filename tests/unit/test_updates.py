"""Update and Reset on the server side: through the Fast-Path of a ControlPlane (MemoryStore +
InProcessFleet, as in test_control_plane.py) for status codes and end-to-end effects, and on
`SandboxUpdates` over a bare MemoryStore for the phase rules and optimistic-concurrency retries."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc
from fastsandbox.api.models import (
    ObjectMeta,
    PoolCapacity,
    Sandbox,
    SandboxPhase,
    SandboxPool,
    SandboxPoolSpec,
    SandboxSpec,
    SandboxStatus,
    parse_rfc3339,
)
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.fastpath.auth import TokenAuth
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.control.registry import Registry
from fastsandbox.control.sandboxes import SandboxService
from fastsandbox.control.updates import (
    SandboxPatch,
    SandboxUpdates,
    format_revision,
    next_revision,
)
from fastsandbox.errors import Conflict, InvalidArgument
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.store.memory import MemoryStore

TOKEN = "test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
IMG = "127.0.0.1:5000/busybox:latest"
REVISION = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


@dataclass
class Plane:
    plane: ControlPlane
    store: MemoryStore
    stub: fastpath_pb2_grpc.FastPathStub

    async def create(self, name: str, **kw: Any) -> fastpath_pb2.CreateResponse:
        fields: dict[str, Any] = {"name": name, "image": IMG, "pool_ref": "p"} | kw
        reply: fastpath_pb2.CreateResponse = await self.stub.Create(
            fastpath_pb2.CreateRequest(**fields), metadata=AUTH
        )
        return reply

    async def update(self, name: str, **kw: Any) -> dict[str, Any]:
        reply = await self.stub.Update(fastpath_pb2.UpdateRequest(name=name, **kw), metadata=AUTH)
        data: dict[str, Any] = json.loads(reply.object_json)
        return data

    async def reset(self, name: str) -> dict[str, Any]:
        reply = await self.stub.Reset(fastpath_pb2.ObjectRef(name=name), metadata=AUTH)
        data: dict[str, Any] = json.loads(reply.object_json)
        return data

    async def error_of(self, call: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        return info.value


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    store = MemoryStore(bookmark_interval=0.5)
    await store.create(
        SandboxPool(
            metadata=ObjectMeta(name="p"),
            spec=SandboxPoolSpec(
                capacity=PoolCapacity(pool_min=1, pool_max=1), max_sandboxes_per_agent=4
            ),
        )
    )
    cp = ControlPlane(
        store,
        InProcessFleet(tmp_path),
        PlaneSettings(delete_grace_seconds=0, heartbeat_seconds=0.1),
    )
    await cp.start()
    server = grpc.aio.server(interceptors=[TokenAuth(TOKEN)])
    fastpath_pb2_grpc.add_FastPathServicer_to_server(cp.servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Plane(cp, store, fastpath_pb2_grpc.FastPathStub(channel))  # type: ignore[no-untyped-call]
    finally:
        await channel.close()
        await server.stop(0)
        await cp.close()
        await store.close()


# ------------------------------------------------------------------ through the Fast-Path


async def test_ttl_sets_the_expire_time_from_when_the_update_arrives(plane: Plane) -> None:
    await plane.create("s1")
    before = datetime.now(UTC)
    obj = await plane.update("s1", ttl_seconds=300)
    after = datetime.now(UTC)
    expires = parse_rfc3339(obj["spec"]["expireTime"])
    assert before + timedelta(seconds=300) <= expires <= after + timedelta(seconds=300)
    stored = await plane.store.get(Sandbox, "default", "s1")
    assert stored.spec.expire_time == expires


async def test_expire_time_then_no_expiry(plane: Plane) -> None:
    await plane.create("s1", ttl_seconds=60)
    obj = await plane.update("s1", expire_time="2099-01-02T03:04:05Z")
    assert parse_rfc3339(obj["spec"]["expireTime"]) == datetime(2099, 1, 2, 3, 4, 5, tzinfo=UTC)
    obj = await plane.update("s1", clear_expiry=True)
    assert "expireTime" not in obj["spec"]
    assert (await plane.store.get(Sandbox, "default", "s1")).spec.expire_time is None


async def test_labels_are_merged_and_removed_by_key(plane: Plane) -> None:
    await plane.create("s1", labels={"keep": "1", "change": "old", "drop": "x"})
    obj = await plane.update(
        "s1", labels={"change": "new", "add": "", "extra": "e"}, remove_labels=["drop", "absent"]
    )
    assert obj["metadata"]["labels"] == {"keep": "1", "change": "new", "add": "", "extra": "e"}


async def test_failure_policy_and_recovery_timeout_leave_the_rest_alone(plane: Plane) -> None:
    created = await plane.create("s1", command=["sleep"], args=["60"], ttl_seconds=60)
    before = await plane.store.get(Sandbox, "default", "s1")
    obj = await plane.update("s1", failure_policy="AutoRecreate", recovery_timeout_seconds=7)
    assert obj["spec"]["failurePolicy"] == "AutoRecreate"
    assert obj["spec"]["recoveryTimeoutSeconds"] == 7
    after = await plane.store.get(Sandbox, "default", "s1")
    assert after.spec.model_dump(exclude={"failure_policy", "recovery_timeout_seconds"}) == (
        before.spec.model_dump(exclude={"failure_policy", "recovery_timeout_seconds"})
    )
    assert after.metadata.generation == before.metadata.generation + 1
    # An update changes the record only: the container and its status are untouched.
    assert after.status.phase is SandboxPhase.RUNNING
    assert after.status.container_id == created.container_id


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"failure_policy": "Sometimes"}, "spec.failurePolicy: must be Manual or AutoRecreate"),
        ({"recovery_timeout_seconds": 0}, "spec.recoveryTimeoutSeconds"),
        ({"ttl_seconds": 0}, "spec.ttlSeconds: must be positive"),
        ({"ttl_seconds": -5}, "spec.ttlSeconds: must be positive"),
        ({"ttl_seconds": 2**62}, "spec.ttlSeconds: too large"),
        ({"expire_time": "tomorrow"}, "spec.expireTime: must be RFC 3339"),
        ({"expire_time": "2099-01-01T00:00:00"}, "spec.expireTime: needs a timezone"),
        ({"ttl_seconds": 5, "clear_expiry": True}, "spec.expireTime: give only one of"),
        ({"ttl_seconds": 5, "expire_time": "2099-01-01T00:00:00Z"}, "give only one of"),
        ({"labels": {"a": "1"}, "remove_labels": ["a"]}, "metadata.labels: a both set"),
        ({}, "nothing to update"),
    ],
)
async def test_bad_updates_are_invalid_argument_naming_the_field(
    plane: Plane, fields: dict[str, Any], named: str
) -> None:
    await plane.create("s1")
    before = await plane.store.get(Sandbox, "default", "s1")
    err = await plane.error_of(plane.update("s1", **fields))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (err.details() or "")
    after = await plane.store.get(Sandbox, "default", "s1")
    assert after.metadata.resource_version == before.metadata.resource_version


async def test_bad_input_is_invalid_even_for_an_unknown_name(plane: Plane) -> None:
    err = await plane.error_of(plane.update("Not_A_Name", ttl_seconds=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "metadata.name" in (err.details() or "")


async def test_unknown_sandbox_is_not_found(plane: Plane) -> None:
    err = await plane.error_of(plane.update("ghost", ttl_seconds=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await plane.error_of(plane.reset("ghost"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_reset_sets_a_new_revision_each_time(plane: Plane) -> None:
    await plane.create("s1")
    first = (await plane.reset("s1"))["spec"]["resetRevision"]
    second = (await plane.reset("s1"))["spec"]["resetRevision"]
    assert first != second
    for revision in (first, second):
        assert re.fullmatch(REVISION, revision), revision
    assert parse_rfc3339(first) < parse_rfc3339(second)
    stored = await plane.store.get(Sandbox, "default", "s1")
    assert stored.spec.reset_revision == second


async def test_a_sandbox_being_deleted_cannot_change(plane: Plane) -> None:
    # A foreign finalizer keeps the record in Terminating for as long as the test needs it.
    await plane.store.create(
        Sandbox(
            metadata=ObjectMeta(name="held", finalizers=["test.io/hold"]),
            spec=SandboxSpec(image=IMG, pool_ref="no-such-pool"),
        )
    )
    await plane.store.delete(Sandbox, "default", "held")
    try:
        for call in (plane.update("held", ttl_seconds=5), plane.reset("held")):
            err = await plane.error_of(call)
            assert err.code() == grpc.StatusCode.ABORTED
            assert "being deleted" in (err.details() or "")
    finally:
        held = await plane.store.get(Sandbox, "default", "held")
        held.metadata.finalizers = []
        held.metadata.resource_version = ""
        await plane.store.update(held)


# ------------------------------------------------------------------ SandboxUpdates directly


class RacingStore(MemoryStore):
    """A MemoryStore where someone else writes the status right before each of our first
    `races` spec updates, as a reconciler would: the update then meets a real Conflict."""

    def __init__(self, races: int) -> None:
        super().__init__()
        self.races = races
        self.updates = 0

    async def update(self, obj: Any) -> Any:
        self.updates += 1
        if self.races > 0:
            self.races -= 1
            current = await self.get(type(obj), obj.metadata.namespace, obj.metadata.name)
            current.status.message = f"status write {self.races}"
            await self.update_status(current)
        return await super().update(obj)


def service(store: MemoryStore) -> SandboxService:
    return SandboxService(
        store, Registry(), AgentClients(), grace_seconds=0, default_cpu="1", default_memory="64Mi"
    )


async def put(store: MemoryStore, name: str, phase: SandboxPhase, **spec: Any) -> Sandbox:
    return await store.create(
        Sandbox(
            metadata=ObjectMeta(name=name, labels={"a": "1"}),
            spec=SandboxSpec.model_validate({"image": IMG, "poolRef": "p"} | spec),
            status=SandboxStatus(phase=phase),
        )
    )


async def test_conflicts_are_retried_and_keep_the_other_writer() -> None:
    store = RacingStore(races=3)
    try:
        await put(store, "s1", SandboxPhase.RUNNING)
        updated = await SandboxUpdates(service(store)).update(
            "default", "s1", SandboxPatch(labels={"b": "2"})
        )
        assert updated.metadata.labels == {"a": "1", "b": "2"}
        assert store.updates == 4
        stored = await store.get(Sandbox, "default", "s1")
        assert stored.metadata.labels == {"a": "1", "b": "2"}
        assert stored.status.message == "status write 0"  # nothing the racer wrote is lost
    finally:
        await store.close()


async def test_endless_conflicts_give_up_with_conflict() -> None:
    store = RacingStore(races=1000)
    try:
        await put(store, "s1", SandboxPhase.RUNNING)
        with pytest.raises(Conflict, match="kept changing"):
            await SandboxUpdates(service(store)).reset("default", "s1")
        assert (await store.get(Sandbox, "default", "s1")).spec.reset_revision == ""
    finally:
        await store.close()


async def test_an_expired_sandbox_keeps_its_expiry_and_cannot_reset() -> None:
    store = MemoryStore()
    try:
        await put(store, "old", SandboxPhase.EXPIRED, expireTime="2020-01-01T00:00:00Z")
        updates = SandboxUpdates(service(store))
        with pytest.raises(Conflict, match="expired"):
            await updates.update("default", "old", SandboxPatch(expiry_set=True))
        with pytest.raises(Conflict, match="expired"):
            await updates.reset("default", "old")
        relabelled = await updates.update("default", "old", SandboxPatch(labels={"seen": "yes"}))
        assert relabelled.metadata.labels == {"a": "1", "seen": "yes"}
        assert relabelled.spec.expire_time == datetime(2020, 1, 1, tzinfo=UTC)
    finally:
        await store.close()


async def test_resets_within_one_millisecond_still_differ() -> None:
    store = MemoryStore()
    frozen = datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    try:
        await put(store, "s1", SandboxPhase.SUCCEEDED)
        updates = SandboxUpdates(service(store), clock=lambda: frozen)
        revisions = [(await updates.reset("default", "s1")).spec.reset_revision for _ in range(3)]
        assert revisions == [
            "2030-05-06T07:08:09.123Z",
            "2030-05-06T07:08:09.124Z",
            "2030-05-06T07:08:09.125Z",
        ]
    finally:
        await store.close()


async def test_an_empty_patch_is_refused() -> None:
    store = MemoryStore()
    try:
        await put(store, "s1", SandboxPhase.RUNNING)
        with pytest.raises(InvalidArgument, match="nothing to update"):
            await SandboxUpdates(service(store)).update("default", "s1", SandboxPatch())
    finally:
        await store.close()


def test_revision_format_and_order() -> None:
    at = datetime(2030, 1, 1, 0, 0, 0, 999999, tzinfo=UTC)
    assert format_revision(at) == "2030-01-01T00:00:00.999Z"
    assert next_revision("", at) == "2030-01-01T00:00:00.999Z"
    # A clock that went backwards still moves the revision forward.
    assert next_revision("2030-01-01T00:00:05.000Z", at) == "2030-01-01T00:00:05.001Z"
    # A user's own revision string (set at create) is simply replaced.
    assert next_revision("v7", at) == "2030-01-01T00:00:00.999Z"
