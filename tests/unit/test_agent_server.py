"""The agent's gRPC API: a real grpc.aio server on a temp unix socket, a real client stub, and the
FakeRuntime behind it. Checks the proto mapping, status codes, socket mode and shutdown."""

from __future__ import annotations

import asyncio
import re
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from fastsandbox.agent.runtime.base import ContainerState, ContainerStatus
from fastsandbox.agent.runtime.fake import FakeRuntime
from fastsandbox.agent.server import run, state_to_proto
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2, agent_pb2_grpc
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.errors import InvalidArgument, Unauthenticated
from fastsandbox.settings import AgentSettings
from tests.infra import free_port

IMG = "127.0.0.1:5000/busybox:latest"


@dataclass
class Agent:
    stub: agent_pb2_grpc.AgentAsyncStub
    runtime: FakeRuntime
    settings: AgentSettings
    stop: asyncio.Event
    task: asyncio.Task[None]


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    # Unix socket paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    sock_dir = Path(tempfile.mkdtemp(prefix="fsb-agent-", dir="/tmp"))
    settings = AgentSettings(
        name="agent-1",
        pool="p",
        namespace="default",
        listen=f"unix://{sock_dir / 'agent.sock'}",
        state_dir=tmp_path / "state",
        containerd_socket=tmp_path / "none.sock",
        capacity=2,
        agent_ip="10.88.0.7",
        version="v-test",
    )
    runtime = FakeRuntime()
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, ready=ready, stop=stop, runtime=runtime))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # raise the start-up error
    assert ready.is_set()
    channel = grpc.aio.insecure_channel(settings.listen)
    try:
        yield Agent(agent_pb2_grpc.AgentStub(channel), runtime, settings, stop, task)
    finally:
        await channel.close(None)
        stop.set()
        await asyncio.wait_for(task, 10)
        shutil.rmtree(sock_dir, ignore_errors=True)


def spec(sandbox_id: str, port: int = 8080) -> agent_pb2.SandboxRuntimeSpec:
    return agent_pb2.SandboxRuntimeSpec(
        sandbox_id=sandbox_id,
        namespace="default",
        name=f"n-{sandbox_id}",
        image=IMG,
        command=["sh", "-c", "echo hi"],
        env=[agent_pb2.KeyValue(key="A", value="1")],
        labels=[agent_pb2.KeyValue(key="fastsandbox.io/uid", value="u1")],
        exposed_ports=[port],
    )


async def create(agent: Agent, sandbox_id: str, port: int = 8080) -> agent_pb2.SandboxState:
    """`port`: this agent shares its network with its sandboxes, so each needs its own."""
    request = agent_pb2.CreateSandboxRequest(spec=spec(sandbox_id, port))
    reply = await agent.stub.CreateSandbox(request)
    return reply.sandbox


async def test_socket_is_private(agent: Agent) -> None:
    path = Path(agent.settings.listen.removeprefix("unix://"))
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_create_maps_the_spec_and_state(agent: Agent) -> None:
    state = await create(agent, "sb-1")
    assert (state.sandbox_id, state.container_id, state.state) == ("sb-1", "sb-1", "running")
    assert not state.exited
    labels = {kv.key: kv.value for kv in state.labels}
    assert labels["fastsandbox.io/agent"] == "agent-1"
    assert labels["fastsandbox.io/uid"] == "u1"
    made = agent.runtime.specs["sb-1"]
    assert made.command == ("sh", "-c", "echo hi")
    assert made.env == (("A", "1"),)
    again = await create(agent, "sb-1")
    assert again.sandbox_id == "sb-1"


async def test_capacity_is_resource_exhausted_until_a_delete(agent: Agent) -> None:
    await create(agent, "sb-1")
    await create(agent, "sb-2", 8082)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(agent, "sb-3", 8083)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "agent-1" in (err.value.details() or "")
    reply = await agent.stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id="sb-1"))
    assert reply.existed
    await create(agent, "sb-3", 8083)


async def test_delete_is_idempotent(agent: Agent) -> None:
    await create(agent, "sb-1")
    first = await agent.stub.DeleteSandbox(
        agent_pb2.DeleteSandboxRequest(sandbox_id="sb-1", grace_seconds=-1)
    )
    second = await agent.stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id="sb-1"))
    assert (first.existed, second.existed) == (True, False)


async def test_unknown_id_is_not_found(agent: Agent) -> None:
    call = agent.stub.Logs(agent_pb2.SandboxLogsRequest(sandbox_id="nope"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


async def test_bad_request_is_invalid_argument(agent: Agent) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(agent, "../escape")
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_status_reports_agent_sandboxes_and_exit_codes(agent: Agent) -> None:
    await create(agent, "sb-1")
    await create(agent, "sb-2", 8082)
    agent.runtime.exit("sb-2", 42)
    status = await agent.stub.Status(agent_pb2.StatusRequest())
    assert (status.agent_name, status.pool, status.namespace) == ("agent-1", "p", "default")
    assert (status.agent_ip, status.capacity, status.runtime, status.version) == (
        "10.88.0.7",
        2,
        "runc",
        "v-test",
    )
    assert IMG in status.images
    by_id = {s.sandbox_id: s for s in status.sandboxes}
    assert (by_id["sb-1"].state, by_id["sb-1"].exited) == ("running", False)
    assert (by_id["sb-2"].state, by_id["sb-2"].exited, by_id["sb-2"].exit_code) == (
        "stopped",
        True,
        42,
    )


async def test_pull(agent: Agent) -> None:
    reply = await agent.stub.PullImage(agent_pb2.PullImageRequest(image=IMG))
    assert reply.image == IMG
    assert reply.digest.startswith("sha256:")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await agent.stub.PullImage(agent_pb2.PullImageRequest(image=""))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_logs_tail_and_follow(agent: Agent) -> None:
    await create(agent, "sb-1")
    path = agent.settings.state_dir / "logs" / "sb-1.log"
    path.write_bytes(b"a\nb\nc\n")
    tail = agent.stub.Logs(agent_pb2.SandboxLogsRequest(sandbox_id="sb-1", tail_lines=2))
    assert b"".join([m.data async for m in tail]) == b"b\nc\n"

    follow = agent.stub.Logs(
        agent_pb2.SandboxLogsRequest(sandbox_id="sb-1", follow=True, tail_lines=1)
    )
    first = await follow.read()
    assert isinstance(first, agent_pb2.LogData)
    assert first.data == b"c\n"
    with path.open("ab") as f:
        f.write(b"d\n")
    second = await follow.read()
    assert isinstance(second, agent_pb2.LogData)
    assert second.data == b"d\n"
    agent.runtime.exit("sb-1", 0)
    assert await follow.read() is grpc.aio.EOF  # type: ignore[attr-defined]
    assert await follow.code() is grpc.StatusCode.OK


async def test_stop_ends_followers_and_keeps_sandboxes(agent: Agent) -> None:
    await create(agent, "sb-1")
    (agent.settings.state_dir / "logs" / "sb-1.log").write_bytes(b"x\n")
    follow = agent.stub.Logs(agent_pb2.SandboxLogsRequest(sandbox_id="sb-1", follow=True))
    assert isinstance(await follow.read(), agent_pb2.LogData)
    agent.stop.set()
    await asyncio.wait_for(agent.task, 10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await follow.read()
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert [c.id for c in await agent.runtime.list()] == ["sb-1"]
    assert not Path(agent.settings.listen.removeprefix("unix://")).exists()


def test_a_stopped_sandbox_without_exit_code_is_not_a_success() -> None:
    vanished = ContainerState(id="sb-1", status=ContainerStatus.STOPPED, reason="NoTask")
    running = ContainerState(id="sb-2", status=ContainerStatus.RUNNING, pid=7)
    assert (state_to_proto(vanished).exited, state_to_proto(vanished).exit_code) == (True, -1)
    assert (state_to_proto(running).exited, state_to_proto(running).exit_code) == (False, 0)


async def test_a_network_agent_requires_its_token(tmp_path: Path) -> None:
    """On HOST:PORT every call, streaming ones included, needs the bearer token; the control
    plane's `AgentClients` sends it, and only to network targets."""
    listen = f"127.0.0.1:{free_port()}"
    settings = AgentSettings(
        name="agent-tcp",
        pool="p",
        namespace="default",
        listen=listen,
        state_dir=tmp_path / "state",
        containerd_socket=tmp_path / "none.sock",
        token="t0ken",
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, ready=ready, stop=stop, runtime=FakeRuntime()))
    await asyncio.wait_for(ready.wait(), 10)
    channel = grpc.aio.insecure_channel(listen)
    good, bad = AgentClients(token="t0ken"), AgentClients(token="wrong")
    try:
        stub = agent_pb2_grpc.AgentStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Status(agent_pb2.StatusRequest())
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "missing agent token" in (err.value.details() or "")
        logs = stub.Logs(agent_pb2.SandboxLogsRequest(sandbox_id="x"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in logs:
                pass
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED

        assert (await good.get(listen).status()).agent_name == "agent-tcp"
        with pytest.raises(Unauthenticated, match="invalid agent token"):
            await bad.get(listen).status()
    finally:
        await good.close()
        await bad.close()
        await channel.close(None)
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_network_agent_without_token_refuses_to_start(tmp_path: Path) -> None:
    settings = AgentSettings(
        name="agent-open",
        pool="p",
        namespace="default",
        listen=f"127.0.0.1:{free_port()}",
        state_dir=tmp_path / "state",
        containerd_socket=tmp_path / "none.sock",
    )
    with pytest.raises(InvalidArgument, match="--insecure-no-token"):
        await run(settings, ready=None, stop=asyncio.Event(), runtime=FakeRuntime())


async def test_logs_carry_stream_and_timestamp_and_honour_since(agent: Agent) -> None:
    await create(agent, "sb-1")
    (agent.settings.state_dir / "logs" / "sb-1.log").write_bytes(
        b"2026-12-01T20:00:00.000000000Z stdout F early\n"
        b"2026-12-01T20:00:01.500000000Z stderr F oops\n"
        b"2026-12-01T20:00:02.000000000Z stdout F late\n"
    )
    call = agent.stub.Logs(agent_pb2.SandboxLogsRequest(sandbox_id="sb-1"))
    got = [(m.stream, m.timestamp, m.data) async for m in call]
    base = 1796155200.0  # 2026-12-01T20:00:00Z
    assert got == [
        ("stdout", base, b"early\n"),
        ("stderr", base + 1.5, b"oops\n"),
        ("stdout", base + 2, b"late\n"),
    ]
    call = agent.stub.Logs(agent_pb2.SandboxLogsRequest(sandbox_id="sb-1", since_unix=base + 1))
    assert [m.data async for m in call] == [b"oops\n", b"late\n"]


@pytest.mark.parametrize(
    "size", ["cpu_millis", "memory_bytes", "pids_limit", "disk_bytes", "log_max_bytes"]
)
def test_a_negative_size_is_refused_naming_the_field(size: str) -> None:
    """Found by tests/fuzz/test_agent_fuzz.py: pids_limit=-1 answered INTERNAL."""
    from fastsandbox.agent.server import request_from_proto
    from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
    from fastsandbox.errors import InvalidArgument

    spec = agent_pb2.SandboxRuntimeSpec(sandbox_id="s", image="busybox", **{size: -1})
    with pytest.raises(InvalidArgument, match=rf"spec\.{size}: must not be negative"):
        request_from_proto(spec)


def test_a_relative_working_dir_is_refused_naming_the_field() -> None:
    """Found by tests/fuzz/test_agent_fuzz.py at 10 000 cases: working_dir='relative' failed
    inside runc ("Cwd must be an absolute path") and answered INTERNAL."""
    from fastsandbox.agent.server import request_from_proto
    from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
    from fastsandbox.errors import InvalidArgument

    spec = agent_pb2.SandboxRuntimeSpec(sandbox_id="s", image="busybox", working_dir="relative")
    with pytest.raises(InvalidArgument, match=r"spec\.working_dir: must be an absolute path"):
        request_from_proto(spec)


@pytest.mark.parametrize(
    ("field", "spec_args"),
    [
        ("env[0].key", {"env": [("", "")]}),
        ("env[0].key", {"env": [("1A", "x")]}),
        ("env[0].value", {"env": [("A", "x\0y")]}),
        ("command[1]", {"command": ["sh", "a\0b"]}),
        ("args[0]", {"args": ["\0"]}),
    ],
)
def test_an_env_or_argv_runc_cannot_take_is_refused_naming_the_field(
    field: str, spec_args: dict[str, list[Any]]
) -> None:
    """Found by tests/fuzz/test_agent_fuzz.py at 10 000 cases: env key '' failed inside runc
    and answered INTERNAL."""
    from fastsandbox.agent.server import request_from_proto
    from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
    from fastsandbox.errors import InvalidArgument

    env = [agent_pb2.KeyValue(key=k, value=v) for k, v in spec_args.pop("env", [])]
    spec = agent_pb2.SandboxRuntimeSpec(sandbox_id="s", image="busybox", env=env, **spec_args)
    with pytest.raises(InvalidArgument, match=re.escape(f"spec.{field}")):
        request_from_proto(spec)


@pytest.mark.parametrize(("size", "value"), [("memory_bytes", 1), ("log_max_bytes", 1)])
def test_a_tiny_limit_is_refused_naming_the_field(size: str, value: int) -> None:
    """Found by tests/fuzz/test_agent_fuzz.py: memory_bytes=1 failed inside runc (INTERNAL)."""
    from fastsandbox.agent.server import request_from_proto
    from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
    from fastsandbox.errors import InvalidArgument

    spec = agent_pb2.SandboxRuntimeSpec(sandbox_id="s", image="busybox", **{size: value})
    with pytest.raises(InvalidArgument, match=rf"spec\.{size}: at least \d+ bytes"):
        request_from_proto(spec)


@pytest.mark.parametrize(("size", "value"), [("pids_limit", 2**31), ("cpu_millis", 2**62)])
def test_a_limit_beyond_the_kernels_is_refused_naming_the_field(size: str, value: int) -> None:
    from fastsandbox.agent.server import request_from_proto
    from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
    from fastsandbox.errors import InvalidArgument

    spec = agent_pb2.SandboxRuntimeSpec(sandbox_id="s", image="busybox", **{size: value})
    with pytest.raises(InvalidArgument, match=rf"spec\.{size}: at most \d+"):
        request_from_proto(spec)
