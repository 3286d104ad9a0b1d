"""The SDK's seams against a fake Fast-Path server: requests, replies, errors, auth, resolution."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from fastsandbox import sdk
from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2
from fastsandbox.sdk import (
    AlreadyExists,
    AsyncClient,
    CapacityExhausted,
    Client,
    CreateResult,
    FsbError,
    InvalidArgument,
    LogRecord,
    NotFound,
    Sandbox,
    Unauthenticated,
    Unavailable,
)
from fastsandbox.sdk._core import resolve
from tests.unit.fastpath_fake import TOKEN, FakeFastPath, free_port, isolate_env, serve


@pytest.fixture(autouse=True)
def data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    return isolate_env(monkeypatch, tmp_path)


@pytest.fixture
def fake() -> FakeFastPath:
    return FakeFastPath()


@pytest.fixture
def endpoint(fake: FakeFastPath) -> Iterator[str]:
    with serve(fake) as address:
        yield address


def test_public_surface_is_pinned() -> None:
    assert sorted(sdk.__all__) == [
        "AlreadyExists",
        "AsyncClient",
        "AsyncSandbox",
        "CapacityExhausted",
        "Client",
        "CommandFailed",
        "CommandHandle",
        "CommandResult",
        "CommandTimeout",
        "Conflict",
        "CreateOptions",
        "CreateResult",
        "EntryInfo",
        "FailedPrecondition",
        "FsbError",
        "InvalidArgument",
        "LogRecord",
        "NotFound",
        "PoolOptions",
        "RuntimeFailure",
        "Sandbox",
        "Unauthenticated",
        "Unavailable",
    ]
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None


# ---------------------------------------------------------------- AsyncClient


async def test_async_create_builds_the_request_and_returns_a_result(
    fake: FakeFastPath, endpoint: str
) -> None:
    expire = datetime(2030, 1, 1, tzinfo=UTC)
    async with AsyncClient(endpoint, TOKEN, "team") as client:
        result = await client.create(
            "demo",
            "busybox",
            pool="p1",
            command=["sh", "-c"],
            args=["echo $A"],
            env={"A": "1"},
            working_dir="/w",
            ports=[8080, 9090],
            expire_time=expire,
            failure_policy="AutoRecreate",
            recovery_timeout=30,
            labels={"team": "x"},
            mode="strong",
            idempotency_key="k1",
            resources={"cpu": "500m", "memory": "64Mi"},
        )
    assert isinstance(result, CreateResult)
    assert (result.name, result.namespace, result.uid) == ("demo", "team", "uid-demo")
    assert (result.agent, result.agent_ip, result.container_id) == (
        "default-pool-a1", "10.88.0.2", "ctr-demo"
    )  # fmt: skip
    assert result.endpoints == ("10.88.0.2:8080", "10.88.0.2:9090")
    assert result.timings.runtime_ready_ms == 42.0
    assert result.object.spec.pool_ref == "p1"

    req = fake.calls[-1].request
    assert (req.namespace, req.pool_ref, req.working_dir) == ("team", "p1", "/w")
    assert (list(req.command), list(req.args)) == (["sh", "-c"], ["echo $A"])
    assert [(e.name, e.value) for e in req.env] == [("A", "1")]
    assert datetime.fromisoformat(req.expire_time) == expire
    assert (req.failure_policy, req.recovery_timeout_seconds) == ("AutoRecreate", 30)
    assert (dict(req.labels), req.mode, req.idempotency_key) == ({"team": "x"}, "strong", "k1")
    assert (req.resources.cpu, req.resources.memory) == ("500m", "64Mi")
    assert fake.calls[-1].metadata["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    "env",
    [
        {"A": "1", "B": "x=y"},
        ["A=1", "B=x=y"],
        [("A", "1"), ("B", "x=y")],
        [{"name": "A", "value": "1"}, {"name": "B", "value": "x=y"}],
    ],
)
async def test_env_shapes(fake: FakeFastPath, endpoint: str, env: object) -> None:
    async with AsyncClient(endpoint, TOKEN) as client:
        await client.create("demo", "busybox", env=env, ttl=timedelta(minutes=2))  # type: ignore[arg-type]
    req = fake.calls[-1].request
    assert [(e.name, e.value) for e in req.env] == [("A", "1"), ("B", "x=y")]
    assert (req.ttl_seconds, req.pool_ref, req.namespace) == (120, "default-pool", "default")


async def test_async_get_list_delete_logs(fake: FakeFastPath, endpoint: str) -> None:
    fake.add_sandbox("a", labels={"k": "v"})
    fake.add_sandbox("b")
    fake.add_sandbox("c", namespace="other")
    async with AsyncClient(endpoint, TOKEN) as client:
        assert (await client.get("a")).status.container_id == "ctr-a"
        assert [s.metadata.name for s in await client.list()] == ["a", "b"]
        assert [s.metadata.name for s in await client.list(labels={"k": "v"})] == ["a"]
        assert len(await client.list(all_namespaces=True)) == 3
        assert [s.metadata.name for s in await client.list(namespace="other")] == ["c"]
        chunks = [chunk async for chunk in client.logs("a", follow=True)]
        assert chunks == [b"hello\n", b"\x00\xff raw\n"]
        assert await client.delete("a", wait=True) == "Deleted"
        with pytest.raises(NotFound, match="sandbox default/a not found"):
            await client.get("a")


async def test_async_pools(fake: FakeFastPath, endpoint: str) -> None:
    async with AsyncClient(endpoint, TOKEN) as client:
        pool = await client.create_pool("p", pool_min=2, per_agent=3, runtime="gvisor")
        assert (pool.spec.capacity.pool_min, pool.spec.capacity.pool_max) == (2, 2)
        assert pool.spec.max_sandboxes_per_agent == 3
        assert (await client.get_pool("p")).metadata.uid == "uid-p"
        assert [p.metadata.name for p in await client.list_pools()] == ["p"]
        assert await client.delete_pool("p") == "Deleted"
        with pytest.raises(NotFound):
            await client.get_pool("p")


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, CapacityExhausted),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
    ],
)
async def test_async_errors_are_translated(
    fake: FakeFastPath, endpoint: str, code: grpc.StatusCode, error: type[FsbError]
) -> None:
    fake.fail("Create", code, "server words")
    async with AsyncClient(endpoint, TOKEN) as client:
        with pytest.raises(error) as info:
            await client.create("demo", "busybox")
    assert info.value.message == "server words"  # a server's own UNAVAILABLE keeps its words


async def test_async_logs_errors_are_translated(fake: FakeFastPath, endpoint: str) -> None:
    async with AsyncClient(endpoint, TOKEN) as client:
        with pytest.raises(NotFound):
            [chunk async for chunk in client.logs("ghost")]


async def test_async_wrong_token_is_unauthenticated(endpoint: str) -> None:
    async with AsyncClient(endpoint, "wrong") as client:
        with pytest.raises(Unauthenticated, match="invalid API token"):
            await client.list()


async def test_async_server_down_is_unavailable_with_a_hint() -> None:
    address = f"127.0.0.1:{free_port()}"
    async with AsyncClient(address, "t") as client:
        with pytest.raises(Unavailable) as info:
            await client.list()
    assert info.value.message == (f"cannot reach fsb server at {address}: is `fsb server` running?")


async def test_async_validation_fails_before_any_rpc(fake: FakeFastPath, endpoint: str) -> None:
    async with AsyncClient(endpoint, TOKEN) as client:
        with pytest.raises(InvalidArgument, match=r"spec\.exposedPorts\[0\]: must be 1\.\.65535"):
            await client.create("demo", "busybox", ports=[0])
        with pytest.raises(InvalidArgument, match="not both"):
            await client.create("demo", "busybox", ttl=5, expire_time="2030-01-01T00:00:00Z")
        with pytest.raises(InvalidArgument, match=r"spec\.command: must be a list"):
            await client.create("demo", "busybox", command="echo hi")
    assert fake.calls == []


async def test_async_no_token_fails_at_the_first_call_not_before(
    fake: FakeFastPath, endpoint: str, data_dir: Path
) -> None:
    client = AsyncClient(endpoint)  # constructing needs no token
    with pytest.raises(InvalidArgument):
        await client.create("demo", "")  # validation still answers first
    with pytest.raises(Unauthenticated, match=str(data_dir / "token")):
        await client.list()
    await client.close()
    assert fake.calls == []


# ---------------------------------------------------------------- Client (sync)


def test_sync_client_round_trip(fake: FakeFastPath, endpoint: str) -> None:
    with Client(endpoint, TOKEN) as client:
        result = client.create("demo", "busybox", ports=[80])
        assert result.endpoints == ("10.88.0.2:80",)
        assert client.get("demo").status.phase == "Running"
        assert client.get_raw("demo")["status"]["containerID"] == "ctr-demo"
        assert [s.metadata.name for s in client.list()] == ["demo"]
        assert b"".join(client.logs("demo")) == b"hello\n\x00\xff raw\n"
        assert client.delete("demo") == "Terminating"
        with pytest.raises(NotFound):
            client.get("demo")
        client.create_pool("p")
        assert [p["metadata"]["name"] for p in client.list_pools_raw()] == ["p"]
    client.close()  # a second close is harmless


def test_sync_client_errors(fake: FakeFastPath, endpoint: str) -> None:
    fake.fail("Create", grpc.StatusCode.RESOURCE_EXHAUSTED, "pool default-pool is full")
    with Client(endpoint, TOKEN) as client:
        with pytest.raises(CapacityExhausted, match="is full"):
            client.create("demo", "busybox")
        with pytest.raises(InvalidArgument, match=r"spec\.env\[0\]\.name: required"):
            client.create("demo", "busybox", env=["=x"])
    with Client(f"127.0.0.1:{free_port()}", "t") as client, pytest.raises(Unavailable):
        client.list()


def test_sync_logs_stopped_early_closes_cleanly(fake: FakeFastPath, endpoint: str) -> None:
    fake.add_sandbox("demo")
    with Client(endpoint, TOKEN) as client:
        for chunk in client.logs("demo", follow=True):
            assert chunk == b"hello\n"
            break
        assert client.get("demo").metadata.name == "demo"  # the client still works


async def test_sync_client_works_inside_a_running_loop(fake: FakeFastPath, endpoint: str) -> None:
    asyncio.get_running_loop()
    with Client(endpoint, TOKEN) as client:
        assert client.list() == []


def test_sandbox_handle_deletes_on_exit(fake: FakeFastPath, endpoint: str) -> None:
    with Sandbox.create(
        "busybox", name="demo", command=["echo", "hi"], endpoint=endpoint, token=TOKEN
    ) as sb:
        assert sb.name == "demo" and sb.endpoints == ()
        assert sb.get().spec.command == ["echo", "hi"]
        assert b"hello" in b"".join(sb.logs())
    assert fake.calls[-1].method == "Delete"
    assert fake.calls[-1].request.wait is True
    assert ("default", "demo") not in fake.sandboxes


def test_sandbox_handle_owns_a_client_from_the_environment(
    fake: FakeFastPath, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FSB_ENDPOINT", endpoint)
    monkeypatch.setenv("FSB_TOKEN", TOKEN)
    with Sandbox.create("busybox", name="demo") as sb:
        assert sb.name == "demo"
    assert fake.methods() == ["Create", "Delete"]


# ---------------------------------------------------------------- resolution


def test_resolution_precedence(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("endpoint: cfg:1\ntoken: cfg-token\nnamespace: cfg-ns\n")
    env = {"FSB_CONFIG": str(config), "FSB_DATA_DIR": str(tmp_path / "none")}

    resolved = resolve(env=env)
    assert (resolved.endpoint, resolved.token, resolved.namespace) == (
        "cfg:1",
        "cfg-token",
        "cfg-ns",
    )

    env |= {"FSB_ENDPOINT": "env:2", "FSB_TOKEN": "env-token", "FSB_NAMESPACE": "env-ns"}
    resolved = resolve(env=env)
    assert (resolved.endpoint, resolved.token, resolved.namespace) == (
        "env:2",
        "env-token",
        "env-ns",
    )

    resolved = resolve("arg:3", "arg-token", "arg-ns", env=env)
    assert (resolved.endpoint, resolved.token, resolved.namespace) == (
        "arg:3",
        "arg-token",
        "arg-ns",
    )


def test_resolution_defaults_and_token_file(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    data = tmp_path / "xdg-data" / "fastsandbox"
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    resolved = resolve(env=env)
    assert (resolved.endpoint, resolved.namespace, resolved.token) == (
        "127.0.0.1:9090", "default", None
    )  # fmt: skip
    with pytest.raises(Unauthenticated, match="no API token: use --token-file, set FSB_TOKEN"):
        resolved.metadata()

    data.mkdir(parents=True)
    (data / "token").write_text("file-token\n")
    assert resolve(env=env).token == "file-token"  # $XDG_DATA_HOME/fastsandbox/token

    other = tmp_path / "other"
    other.mkdir()
    (other / "token").write_text("other-token")
    assert resolve(env=env | {"FSB_DATA_DIR": str(other)}).metadata() == (
        ("authorization", "Bearer other-token"),
    )


def test_bad_config_file_is_invalid_argument(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("- just\n- a list\n")
    with pytest.raises(InvalidArgument, match="expected a mapping"):
        resolve(env={"FSB_CONFIG": str(config)})


async def test_log_records_keep_streams_apart_and_send_tail_and_since(
    fake: FakeFastPath, endpoint: str
) -> None:
    fake.add_sandbox("a")
    fake.log_chunks = [
        fastpath_pb2.LogChunk(data=b"out\n", stream="stdout", timestamp=100.5),
        fastpath_pb2.LogChunk(data=b"err\n", stream="stderr", timestamp=101.0),
    ]
    async with AsyncClient(endpoint, TOKEN) as client:
        records = [r async for r in client.log_records("a", tail=5, since=90.0)]
        assert records == [
            LogRecord(stream="stdout", data=b"out\n", timestamp=100.5),
            LogRecord(stream="stderr", data=b"err\n", timestamp=101.0),
        ]
        req = fake.calls[-1].request
        assert (req.tail_lines, req.since_unix, req.follow) == (5, 90.0, False)
        before = time.time()
        assert [c async for c in client.logs("a", since=timedelta(minutes=1))] == [
            b"out\n",
            b"err\n",
        ]
        assert before - 61 < fake.calls[-1].request.since_unix <= time.time() - 60
        with pytest.raises(InvalidArgument, match="tail"):
            [r async for r in client.log_records("a", tail=-1)]
        with pytest.raises(InvalidArgument, match="since"):
            [r async for r in client.log_records("a", since=datetime(2026, 1, 1))]
    with Client(endpoint, TOKEN) as sync_client:
        streams = [r.stream for r in sync_client.log_records("a")]
        assert streams == ["stdout", "stderr"]
