"""The agent's I/O RPCs end to end in-process: a real grpc.aio agent on a temp unix socket with
the FakeRuntime, and the Python supervisor (tests/unit/fake_supervisor.py) dialling the channel
the agent made for the sandbox, with the secret the agent put in PID 1's environment."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fastsandbox.agent.runtime.fake import FakeRuntime
from fastsandbox.agent.server import run
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2, agent_pb2_grpc, io_pb2
from fastsandbox.settings import AgentSettings
from tests.unit.fake_supervisor import FakeSupervisor

IMG = "127.0.0.1:5000/busybox:latest"
SID = "sb-io-1"


@dataclass
class Env:
    stub: agent_pb2_grpc.AgentStub
    runtime: FakeRuntime
    sup: FakeSupervisor
    root: Path
    agent: list[tuple[asyncio.Event, asyncio.Task[None]]]
    settings: AgentSettings

    async def restart_agent(self) -> None:
        """Stop the agent (sandboxes keep running) and start a new one on the same state."""
        stop, task = self.agent.pop()
        stop.set()
        await task
        self.agent.append(await _start(self.settings, self.runtime))


async def _start(
    settings: AgentSettings, runtime: FakeRuntime
) -> tuple[asyncio.Event, asyncio.Task[None]]:
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, ready=ready, stop=stop, runtime=runtime))
    await asyncio.wait_for(ready.wait(), 10)
    return stop, task


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    sock_dir = Path(tempfile.mkdtemp(prefix="fsb-agent-", dir="/tmp"))
    settings = AgentSettings(
        name="agent-io",
        pool="p",
        namespace="default",
        listen=f"unix://{sock_dir / 'agent.sock'}",
        state_dir=tmp_path / "state",
        containerd_socket=tmp_path / "none.sock",
        init_path=Path("/bin/true"),  # only mounted by a real runtime; the fake ignores it
    )
    runtime = FakeRuntime()
    agent = [await _start(settings, runtime)]
    channel = grpc.aio.insecure_channel(settings.listen)
    stub = agent_pb2_grpc.AgentStub(channel)
    spec = agent_pb2.SandboxRuntimeSpec(
        sandbox_id=SID,
        image=IMG,
        working_dir="/tmp",
        env=[
            agent_pb2.KeyValue(key="FROM_SANDBOX", value="s"),
            agent_pb2.KeyValue(key="OVER", value="sandbox"),
        ],
    )
    await stub.CreateSandbox(agent_pb2.CreateSandboxRequest(spec=spec))
    made = runtime.specs[SID]
    assert made.channel_dir and dict(made.init_env)["FSB_CHANNEL"] == "/.fsb/run"
    root = tmp_path / "root"
    (root / "tmp").mkdir(parents=True)
    sup = FakeSupervisor(
        Path(made.channel_dir), SID, dict(made.init_env)["FSB_SUPERVISOR_SECRET"], root
    )
    sup.start()
    try:
        yield Env(stub, runtime, sup, root, agent, settings)
    finally:
        await sup.stop()
        await channel.close()
        for stop, task in agent:
            stop.set()
            await task
        shutil.rmtree(sock_dir, ignore_errors=True)


def target(sid: str = SID) -> io_pb2.SandboxTarget:
    return io_pb2.SandboxTarget(sandbox_id=sid)


async def _exec(stub: agent_pb2_grpc.AgentStub, start: io_pb2.ExecStart, *inputs: io_pb2.ExecInput):  # type: ignore[no-untyped-def]
    async def gen() -> AsyncIterator[io_pb2.ExecInput]:
        yield io_pb2.ExecInput(start=start)
        for i in inputs:
            yield i

    return [m async for m in stub.Exec(gen())]


async def test_exec_env_cwd_stdin_exit(env: Env) -> None:
    start = io_pb2.ExecStart(
        target=target(),
        argv=["sh", "-c", 'cat; echo "$FROM_SANDBOX $OVER $MINE $(pwd)"; echo e >&2; exit 7'],
        env=[
            io_pb2.KeyValuePair(key="OVER", value="exec"),
            io_pb2.KeyValuePair(key="MINE", value="m"),
        ],
        stdin=True,
    )
    out = await _exec(
        env.stub, start, io_pb2.ExecInput(stdin=b"in\n"), io_pb2.ExecInput(close_stdin=True)
    )
    kinds = [m.WhichOneof("kind") for m in out]
    assert kinds[0] == "started" and kinds[-1] == "exited"
    assert out[0].started.pid > 0
    stdout = b"".join(m.stdout for m in out if m.WhichOneof("kind") == "stdout")
    stderr = b"".join(m.stderr for m in out if m.WhichOneof("kind") == "stderr")
    assert stdout == f"in\ns exec m {env.root / 'tmp'}\n".encode()
    assert stderr == b"e\n"
    assert out[-1].exited.exit_code == 7


async def test_exec_signal_and_list_processes(env: Env) -> None:
    async def gen() -> AsyncIterator[io_pb2.ExecInput]:
        yield io_pb2.ExecInput(start=io_pb2.ExecStart(target=target(), argv=["sleep", "30"]))
        while not env.sup.procs:
            await asyncio.sleep(0.01)
        procs = await env.stub.ListProcesses(io_pb2.ProcessesRequest(target=target()))
        assert [p.argv for p in procs.processes if p.running] == [["sleep", "30"]]
        yield io_pb2.ExecInput(signal=9)

    out = [m async for m in env.stub.Exec(gen())]
    assert out[-1].exited.exit_code == 137 and out[-1].exited.signal == 9


async def test_exec_errors(env: Env) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _exec(env.stub, io_pb2.ExecStart(target=target("nope-1"), argv=["true"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope-1" in str(err.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _exec(env.stub, io_pb2.ExecStart(target=target(), argv=[]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "argv" in str(
        err.value.details()
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _exec(env.stub, io_pb2.ExecStart(target=target(), argv=["/no/such"]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "/no/such" in str(err.value.details())
    # The sandbox ends: its PID 1 (the supervisor) goes, and with it the channel's connection.
    await env.sup.stop()
    env.runtime.exit(SID, 3)
    for _ in range(100):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _exec(env.stub, io_pb2.ExecStart(target=target(), argv=["true"]))
        # Until the agent has seen the connection drop, a call meets the loss instead.
        if err.value.code() != grpc.StatusCode.UNAVAILABLE:
            break
        await asyncio.sleep(0.01)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stopped" in str(err.value.details())


async def test_file_ops_and_errors(env: Env) -> None:
    def op(**kw: object) -> io_pb2.FileOpRequest:
        return io_pb2.FileOpRequest(target=target(), **kw)  # type: ignore[arg-type]

    r = await env.stub.FileOp(op(op="mkdir", path="/tmp/a/b", recursive=True))
    assert r.created
    r = await env.stub.FileOp(op(op="list", path="/tmp", depth=2))
    assert [e.path for e in r.entries] == ["/tmp/a", "/tmp/a/b"]
    r = await env.stub.FileOp(op(op="move", path="/tmp/a", destination="/tmp/c"))
    assert r.entries[0].path == "/tmp/c" and r.entries[0].type == "dir"
    for request, code in [
        (op(op="stat", path="/tmp/a"), grpc.StatusCode.NOT_FOUND),
        (op(op="remove", path="/tmp/a"), grpc.StatusCode.NOT_FOUND),
        (op(op="list", path="/tmp/zz"), grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.stub.FileOp(request)
        assert err.value.code() == code and "/tmp/" in str(err.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.FileOp(op(op="chown", path="/tmp"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "op" in str(err.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [c async for c in env.stub.ReadFile(io_pb2.ReadFileRequest(target=target(), path="/tmp/c"))]
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "/tmp/c" in str(err.value.details())
    await env.stub.FileOp(op(op="remove", path="/tmp/c", recursive=True))


async def test_write_then_read_streams(env: Env) -> None:
    block = os.urandom(1 << 20)
    want = hashlib.sha256(block * 6).hexdigest()

    async def upload() -> AsyncIterator[io_pb2.WriteFileInput]:
        header = io_pb2.WriteFileHeader(
            target=target(), path="/tmp/up/f.bin", parents=True, mode=0o600
        )
        yield io_pb2.WriteFileInput(header=header)
        for _ in range(6):
            yield io_pb2.WriteFileInput(data=block)

    r = await env.stub.WriteFile(upload())
    assert r.entry.size == 6 << 20 and r.entry.mode == 0o600
    h = hashlib.sha256()
    chunks = 0
    async for chunk in env.stub.ReadFile(
        io_pb2.ReadFileRequest(target=target(), path="/tmp/up/f.bin")
    ):
        if chunks == 0:
            assert chunk.entry.size == 6 << 20
        else:
            assert not chunk.HasField("entry")
        assert len(chunk.data) <= 256 * 1024
        h.update(chunk.data)
        chunks += 1
    assert h.hexdigest() == want
    empty = (
        [
            c
            async for c in env.stub.ReadFile(
                io_pb2.ReadFileRequest(target=target(), path="/tmp/empty")
            )
        ]
        if False
        else None
    )
    assert empty is None


async def test_empty_file_and_watch(env: Env) -> None:
    async def upload() -> AsyncIterator[io_pb2.WriteFileInput]:
        yield io_pb2.WriteFileInput(header=io_pb2.WriteFileHeader(target=target(), path="/tmp/e"))

    await env.stub.WriteFile(upload())
    chunks = [
        c async for c in env.stub.ReadFile(io_pb2.ReadFileRequest(target=target(), path="/tmp/e"))
    ]
    assert len(chunks) == 1 and chunks[0].entry.path == "/tmp/e" and chunks[0].data == b""
    call = env.stub.Watch(io_pb2.WatchRequest(target=target(), path="/tmp"))
    while not env.sup.watchers:
        await asyncio.sleep(0.01)
    await env.stub.FileOp(io_pb2.FileOpRequest(target=target(), op="mkdir", path="/tmp/w"))
    event = await call.read()
    assert (event.event, event.path, event.type) == ("create", "/tmp/w", "dir")
    call.cancel()


async def test_delete_removes_channel_dir(env: Env) -> None:
    channel_dir = Path(env.runtime.specs[SID].channel_dir or "")
    assert channel_dir.is_dir()
    await env.stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id=SID))
    assert not channel_dir.exists()


async def test_agent_restart_keeps_processes(env: Env) -> None:
    """A process started before an agent restart keeps running; after it the supervisor redials
    the re-made socket, the process can be attached to, and a new exec works."""

    async def gen() -> AsyncIterator[io_pb2.ExecInput]:
        yield io_pb2.ExecInput(
            start=io_pb2.ExecStart(
                target=target(), argv=["sh", "-c", "read x; echo got $x"], stdin=True
            )
        )
        await asyncio.Event().wait()  # keep the call open until the agent goes

    call = env.stub.Exec(gen())
    started = await call.read()
    pid = started.started.pid
    await env.restart_agent()
    with pytest.raises(grpc.aio.AioRpcError):
        await call.read()  # the old agent ended the call (UNAVAILABLE/CANCELLED)
    out = await _exec(
        env.stub,
        io_pb2.ExecStart(target=target(), attach_pid=pid),
        io_pb2.ExecInput(stdin=b"it\n"),
    )
    assert b"".join(m.stdout for m in out) == b"got it\n" and out[-1].exited.exit_code == 0
    out = await _exec(env.stub, io_pb2.ExecStart(target=target(), argv=["echo", "new"]))
    assert out[1].stdout == b"new\n"
    assert env.sup.controls >= 2


async def test_stdin_refused_without_stdin_even_while_silent(env: Env) -> None:
    """Input the call must refuse ends it at once, not at the process's next output."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _exec(
            env.stub,
            io_pb2.ExecStart(target=target(), argv=["sleep", "30"]),
            io_pb2.ExecInput(stdin=b"x"),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stdin" in str(err.value.details())
