"""A fake Fast-Path server for client tests: the real gRPC interface, canned behaviour.

It implements `FastPathServicer` over a real `grpc.aio` server on loopback, running in its own
thread and event loop (so synchronous code such as `CliRunner.invoke` or `Client` can call it
without deadlocking the test's loop). It checks the bearer token like the real server, records
every call with its metadata, and fails a method on demand (`fail("Get", NOT_FOUND, ...)`).
This tests the clients, not the server.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc
from fastsandbox.api.models import (
    ObjectMeta,
    Sandbox,
    SandboxPhase,
    SandboxPool,
    SandboxSpec,
    SandboxStatus,
    Timings,
    to_wire,
)
from tests.unit.loop_thread import serve_in_thread

TOKEN = "test-token-123"
CREATED = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


@dataclass
class Call:
    method: str
    request: Any
    metadata: dict[str, str]


@dataclass
class FakeFastPath(fastpath_pb2_grpc.FastPathServicer):
    token: str = TOKEN
    calls: list[Call] = field(default_factory=list)
    failures: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    sandboxes: dict[tuple[str, str], Sandbox] = field(default_factory=dict)
    pools: dict[tuple[str, str], SandboxPool] = field(default_factory=dict)
    log_chunks: list[bytes | fastpath_pb2.LogChunk] = field(
        default_factory=lambda: [b"hello\n", b"\x00\xff raw\n"]
    )

    def fail(self, method: str, code: grpc.StatusCode, details: str) -> None:
        self.failures[method] = (code, details)

    def methods(self) -> list[str]:
        return [c.method for c in self.calls]

    def add_sandbox(self, name: str, namespace: str = "default", **spec: Any) -> Sandbox:
        sb = Sandbox(
            metadata=ObjectMeta(
                name=name,
                namespace=namespace,
                uid=f"uid-{name}",
                creation_timestamp=CREATED,
                labels=spec.pop("labels", {}),
            ),
            spec=SandboxSpec.model_validate({"image": "busybox", "poolRef": "default-pool"} | spec),
            status=SandboxStatus(
                phase=SandboxPhase.RUNNING,
                assigned_agent="default-pool-a1",
                agent_ip="10.88.0.2",
                endpoints=[f"10.88.0.2:{p}" for p in spec.get("exposedPorts", [])],
                container_id=f"ctr-{name}",
                timings=Timings(accepted_ms=0.5, scheduled_ms=1.25, runtime_ready_ms=42.0),
            ),
        )
        self.sandboxes[(namespace, name)] = sb
        return sb

    async def _enter(
        self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
        self.calls.append(Call(method, request, metadata))
        if metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid API token: check --token")
        if method in self.failures:
            await context.abort(*self.failures[method])

    async def _missing(self, context: grpc.aio.ServicerContext, kind: str, ref: Any) -> None:
        await context.abort(
            grpc.StatusCode.NOT_FOUND, f"{kind} {ref.namespace}/{ref.name} not found"
        )

    # ------------------------------------------------------------------ sandboxes

    async def Create(self, request: Any, context: Any) -> fastpath_pb2.CreateResponse:
        await self._enter("Create", request, context)
        if (request.namespace, request.name) in self.sandboxes:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"sandbox {request.name} exists")
        sb = self.add_sandbox(
            request.name,
            request.namespace,
            image=request.image,
            poolRef=request.pool_ref,
            command=list(request.command),
            args=list(request.args),
            env=[{"name": e.name, "value": e.value} for e in request.env],
            workingDir=request.working_dir,
            exposedPorts=list(request.exposed_ports),
            labels=dict(request.labels),
        )
        return fastpath_pb2.CreateResponse(
            name=sb.metadata.name,
            namespace=sb.metadata.namespace,
            uid=sb.metadata.uid,
            container_id=sb.status.container_id,
            agent=sb.status.assigned_agent,
            agent_ip=sb.status.agent_ip,
            endpoints=sb.status.endpoints,
            timings=fastpath_pb2.Timings(accepted_ms=0.5, scheduled_ms=1.25, runtime_ready_ms=42),
            phase=sb.status.phase.value,
            object_json=json.dumps(to_wire(sb)),
        )

    async def Get(self, request: Any, context: Any) -> fastpath_pb2.ObjectReply:
        await self._enter("Get", request, context)
        sb = self.sandboxes.get((request.namespace, request.name))
        if sb is None:
            await self._missing(context, "sandbox", request)
        return fastpath_pb2.ObjectReply(object_json=json.dumps(to_wire(sb)))  # type: ignore[arg-type]

    async def List(self, request: Any, context: Any) -> fastpath_pb2.ListReply:
        await self._enter("List", request, context)
        items = [
            json.dumps(to_wire(sb))
            for (ns, _), sb in sorted(self.sandboxes.items())
            if request.namespace in ("", ns)
            and all(sb.metadata.labels.get(k) == v for k, v in request.label_selector.items())
        ]
        return fastpath_pb2.ListReply(objects_json=items)

    async def Delete(self, request: Any, context: Any) -> fastpath_pb2.DeleteReply:
        await self._enter("Delete", request, context)
        if self.sandboxes.pop((request.namespace, request.name), None) is None:
            await self._missing(context, "sandbox", request)
        return fastpath_pb2.DeleteReply(phase="Deleted" if request.wait else "Terminating")

    async def Update(self, request: Any, context: Any) -> fastpath_pb2.ObjectReply:
        await self._enter("Update", request, context)
        sb = self.sandboxes.get((request.namespace, request.name))
        if sb is None:
            await self._missing(context, "sandbox", request)
        assert sb is not None
        if request.HasField("expire_time"):
            sb.spec.expire_time = datetime.fromisoformat(request.expire_time)
        if request.HasField("ttl_seconds"):
            sb.spec.expire_time = CREATED + timedelta(seconds=request.ttl_seconds)
        if request.clear_expiry:
            sb.spec.expire_time = None
        labels = sb.metadata.labels | dict(request.labels)
        sb.metadata.labels = {k: v for k, v in labels.items() if k not in request.remove_labels}
        if request.HasField("failure_policy"):
            sb.spec.failure_policy = request.failure_policy
        if request.HasField("recovery_timeout_seconds"):
            sb.spec.recovery_timeout_seconds = request.recovery_timeout_seconds
        return fastpath_pb2.ObjectReply(object_json=json.dumps(to_wire(sb)))

    async def Reset(self, request: Any, context: Any) -> fastpath_pb2.ObjectReply:
        await self._enter("Reset", request, context)
        sb = self.sandboxes.get((request.namespace, request.name))
        if sb is None:
            await self._missing(context, "sandbox", request)
        assert sb is not None
        sb.spec.reset_revision = "2025-01-02T03:04:06.000Z"
        return fastpath_pb2.ObjectReply(object_json=json.dumps(to_wire(sb)))

    async def Logs(self, request: Any, context: Any) -> AsyncIterator[fastpath_pb2.LogChunk]:
        await self._enter("Logs", request, context)
        if (request.namespace, request.name) not in self.sandboxes:
            await self._missing(context, "sandbox", request)
        for chunk in self.log_chunks:
            yield (
                chunk
                if isinstance(chunk, fastpath_pb2.LogChunk)
                else fastpath_pb2.LogChunk(data=chunk)
            )

    # ------------------------------------------------------------------ pools

    async def CreatePool(self, request: Any, context: Any) -> fastpath_pb2.ObjectReply:
        await self._enter("CreatePool", request, context)
        pool = SandboxPool.model_validate_json(request.object_json)
        pool.metadata.uid = f"uid-{pool.metadata.name}"
        pool.metadata.creation_timestamp = CREATED
        self.pools[(pool.metadata.namespace, pool.metadata.name)] = pool
        return fastpath_pb2.ObjectReply(object_json=json.dumps(to_wire(pool)))

    async def GetPool(self, request: Any, context: Any) -> fastpath_pb2.ObjectReply:
        await self._enter("GetPool", request, context)
        pool = self.pools.get((request.namespace, request.name))
        if pool is None:
            await self._missing(context, "pool", request)
        return fastpath_pb2.ObjectReply(object_json=json.dumps(to_wire(pool)))  # type: ignore[arg-type]

    async def ListPools(self, request: Any, context: Any) -> fastpath_pb2.ListReply:
        await self._enter("ListPools", request, context)
        items = [
            json.dumps(to_wire(p))
            for (ns, _), p in sorted(self.pools.items())
            if request.namespace in ("", ns)
        ]
        return fastpath_pb2.ListReply(objects_json=items)

    async def DeletePool(self, request: Any, context: Any) -> fastpath_pb2.DeleteReply:
        await self._enter("DeletePool", request, context)
        if self.pools.pop((request.namespace, request.name), None) is None:
            await self._missing(context, "pool", request)
        return fastpath_pb2.DeleteReply(phase="Deleted")


@contextlib.contextmanager
def serve(servicer: FakeFastPath) -> Iterator[str]:
    """Serve `servicer` on 127.0.0.1 from a private loop thread; yields `HOST:PORT`."""

    def add(server: grpc.aio.Server) -> str:
        fastpath_pb2_grpc.add_FastPathServicer_to_server(servicer, server)
        return f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"

    with serve_in_thread(add, name="fake Fast-Path server") as endpoint:
        yield endpoint


def free_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def isolate_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No real config, token or FSB_* variable leaks in; returns the (empty) data dir."""
    for var in (
        "FSB_ENDPOINT",
        "FSB_TOKEN",
        "FSB_NAMESPACE",
        "FSB_CONFIG",
        "FSB_DEBUG",
        "XDG_DATA_HOME",
        "XDG_CONFIG_HOME",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    monkeypatch.setenv("FSB_DATA_DIR", str(data))
    return data
