"""Property-based fuzzing of the Fast-Path's unary RPCs against the real control plane (memory
store, in-process agents over FakeRuntime, a real grpc.aio server with token auth on loopback).

Property: whatever the fields hold, the answer is OK or a deliberate status — never UNKNOWN or
INTERNAL (an unhandled exception) — and an INVALID_ARGUMENT names the field it is about. A
created sandbox is deleted again so capacity never runs out mid-run.

Size: FSB_FUZZ_EXAMPLES (default 500, as CI runs it); `make fuzz` runs 10 000.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc
from fastsandbox.control.fastpath.auth import TokenAuth
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.store.memory import MemoryStore
from tests.unit.test_control_plane import auth, free_port, make_pool

EXAMPLES = int(os.environ.get("FSB_FUZZ_EXAMPLES", "500"))
TOKEN = "test-token"
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("FSB_FUZZ_RANDOM") is None,
)
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
}
# Field names as a message may spell them (the models' camelCase, the proto's snake_case).
FIELD = re.compile(
    r"name|namespace|image|command|args|env|workingDir|working_dir|exposedPorts|exposed_ports|"
    r"port|poolRef|pool_ref|pool|expireTime|expire_time|ttl|failurePolicy|failure_policy|"
    r"recoveryTimeout|recovery_timeout|resetRevision|reset_revision|resources|cpu|memory|pids|"
    r"disk|labels?|mode|idempotency|lease|phase|spec|metadata|capacity|object_json|json|"
    r"runtime|kind|apiVersion|limit|selector",
    re.IGNORECASE,
)

text = st.text(max_size=80)
names = st.sampled_from(["", "box", "a" * 300, "UPPER", "dot.ted", "-x", "ok-name"]) | text
quantity = st.sampled_from(["", "0", "-1", "0.0001", "1", "500m", "1e9", "64Mi", "x", "1Zi"]) | text
ints = st.integers(min_value=-(2**31), max_value=2**31 - 1)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def create_requests() -> st.SearchStrategy[fastpath_pb2.CreateRequest]:
    env = st.lists(st.builds(fastpath_pb2.EnvVar, name=names, value=text), max_size=4)
    resources = st.builds(
        fastpath_pb2.Resources, cpu=quantity, memory=quantity, pids=int64, disk=quantity
    )
    return st.builds(
        fastpath_pb2.CreateRequest,
        namespace=st.sampled_from(["", "default"]) | names,
        name=names,
        image=st.sampled_from(["127.0.0.1:5000/busybox:latest", "", "::bad"]) | text,
        command=st.lists(text, max_size=3),
        args=st.lists(text, max_size=3),
        env=env,
        working_dir=st.sampled_from(["", "/tmp", "relative"]) | text,
        exposed_ports=st.lists(ints, max_size=3),
        pool_ref=st.sampled_from(["p", "", "nope"]) | names,
        expire_time=st.sampled_from(["", "2030-01-01T00:00:00Z", "yesterday"]) | text,
        ttl_seconds=int64,
        failure_policy=st.sampled_from(["", "Manual", "AutoRecreate", "manual"]) | text,
        recovery_timeout_seconds=ints,
        reset_revision=text,
        resources=resources,
        labels=st.dictionaries(names, text, max_size=3),
        mode=st.sampled_from(["", "fast", "strong", "FAST"]) | text,
        idempotency_key=text,
        lease_seconds=int64,
    )


class Harness:
    def __init__(self, root: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._start(root))

    async def _start(self, root: Path) -> None:
        self.store = MemoryStore(bookmark_interval=0.5)
        await make_pool(self.store, "p", agents=1, per_agent=4)
        self.fleet = InProcessFleet(root)
        self.cp = ControlPlane(
            self.store, self.fleet, PlaneSettings(delete_grace_seconds=0, heartbeat_seconds=0.1)
        )
        await self.cp.start()
        self.server = grpc.aio.server(interceptors=[TokenAuth(TOKEN)])
        fastpath_pb2_grpc.add_FastPathServicer_to_server(self.cp.servicer, self.server)  # type: ignore[no-untyped-call]
        port = self.server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = fastpath_pb2_grpc.FastPathStub(self.channel)  # type: ignore[no-untyped-call]

    async def call(self, method: str, request: Any) -> tuple[grpc.StatusCode, str, Any]:
        try:
            reply = await getattr(self.stub, method)(request, metadata=auth(TOKEN), timeout=30)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or "", None
        return grpc.StatusCode.OK, "", reply

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        async def stop() -> None:
            await self.channel.close()
            await self.server.stop(0)
            await self.cp.close()
            await self.store.close()

        self.run(stop())
        self.loop.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def deliberate(method: str, code: grpc.StatusCode, details: str) -> None:
    assert code in DELIBERATE, f"{method} answered {code.name}: {details}"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        assert details.strip() and FIELD.search(details), f"{method}: names no field: {details}"


def test_random_creates_are_answered_deliberately(harness: Harness) -> None:
    h = harness

    @SETTINGS
    @given(create_requests())
    def check(req: fastpath_pb2.CreateRequest) -> None:
        code, details, reply = h.run(h.call("Create", req))
        deliberate("Create", code, details)
        if reply is not None:
            ref = fastpath_pb2.DeleteRequest(namespace=reply.namespace, name=reply.name, wait=True)
            code, details, _ = h.run(h.call("Delete", ref))
            assert code is grpc.StatusCode.OK, details

    check()


def test_random_reads_updates_and_pools_are_answered_deliberately(harness: Harness) -> None:
    h = harness
    ref = st.builds(fastpath_pb2.ObjectRef, namespace=names, name=names)
    calls = st.one_of(
        ref.map(lambda r: ("Get", r)),
        ref.map(lambda r: ("Reset", r)),
        ref.map(lambda r: ("GetPool", r)),
        st.builds(fastpath_pb2.DeleteRequest, namespace=names, name=names).map(
            lambda r: ("Delete", r)
        ),
        st.builds(
            fastpath_pb2.ListRequest,
            namespace=names,
            label_selector=st.dictionaries(names, text, max_size=2),
            pool_ref=names,
            phase=st.sampled_from(["", "Running", "running"]) | text,
        ).map(lambda r: ("List", r)),
        st.builds(
            fastpath_pb2.UpdateRequest,
            namespace=names,
            name=names,
            expire_time=st.none() | text,
            ttl_seconds=st.none() | int64,
            clear_expiry=st.booleans(),
            labels=st.dictionaries(names, text, max_size=2),
            remove_labels=st.lists(names, max_size=2),
            failure_policy=st.none() | text,
            recovery_timeout_seconds=st.none() | ints,
        ).map(lambda r: ("Update", r)),
        st.builds(
            fastpath_pb2.EventsRequest, namespace=names, name=names, kind=text, limit=ints
        ).map(lambda r: ("ListEvents", r)),
        st.builds(fastpath_pb2.RenewLeaseRequest, namespace=names, name=names).map(
            lambda r: ("RenewLease", r)
        ),
        _pool_json().map(lambda j: ("CreatePool", fastpath_pb2.PoolRequest(object_json=j))),
        _pool_json().map(lambda j: ("UpdatePool", fastpath_pb2.PoolRequest(object_json=j))),
    )

    @SETTINGS
    @given(calls)
    def check(call: tuple[str, Any]) -> None:
        method, request = call
        code, details, _ = h.run(h.call(method, request))
        deliberate(method, code, details)

    check()


def _pool_json() -> st.SearchStrategy[str]:
    scalar = st.none() | st.booleans() | int64 | st.floats(allow_nan=False) | text
    value = st.recursive(
        scalar,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8,
    )
    spec = st.fixed_dictionaries(
        {},
        optional={
            "runtime": st.sampled_from(["runc", "gvisor", "kata"]) | value,
            "capacity": st.fixed_dictionaries(
                {}, optional={k: value | ints for k in ("poolMin", "poolMax", "bufferMin")}
            ),
            "maxSandboxesPerAgent": ints | value,
            "warmSlots": ints | value,
            "agentVersion": value,
            "prewarmImages": value,
        },
    )
    obj = st.fixed_dictionaries(
        {"metadata": st.fixed_dictionaries({"name": names}, optional={"namespace": names})},
        optional={"spec": spec | value, "kind": value, "apiVersion": value},
    )
    return obj.map(json.dumps) | text
