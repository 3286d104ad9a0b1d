"""Exec and files through the real agent process, real containerd and the real supervisor
(`fsb-supervisor` as PID 1, dialling its agent's channel), under runc and gVisor: exit codes,
stdin, env and cwd inherited from the sandbox, a PTY and its resize, a 200 MiB round trip with
its sha256 and the agent's RSS growth, file errors that name the path, and an agent killed
during a running exec (the sandbox keeps running; the process can be attached to again; a new
exec works)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from fastsandbox.agent.init_binary import find_init
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2, agent_pb2_grpc, io_pb2
from tests.infra import ContainerdProc, RegistryProc, build_demo_image, push_image
from tests.integration.test_agent_process import AgentProc

pytestmark = pytest.mark.integration

MiB = 1 << 20
BIG = 200 * MiB
RSS_BUDGET = 64 * MiB


def supervisor_binary() -> Path:
    found = find_init()
    if found is None or "supervisor" not in found.name:
        pytest.skip(
            f"needs fsb-supervisor (found {found}): build it (scripts/setup) or set FSB_INIT_PATH"
        )
    return found


def runsc_works() -> str | None:
    if shutil.which("runsc") is None:
        return "runsc not installed"
    return None


@pytest.fixture(params=["runc", "gvisor"])
def runtime_name(request: pytest.FixtureRequest) -> str:
    if request.param == "gvisor" and (why := runsc_works()):
        pytest.skip(why)
    return str(request.param)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fsb-exec-it-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def agent(
    containerd: ContainerdProc,
    registry: RegistryProc,
    cgroup_parent: str,
    tmp_path: Path,
    sock_dir: Path,
    runtime_name: str,
) -> AsyncIterator[AgentProc]:
    init = supervisor_binary()
    name = f"it-exec-{uuid.uuid4().hex[:8]}"
    socket = sock_dir / "agent.sock"
    state_dir = tmp_path / "state"
    argv = [
        sys.executable, "-m", "fastsandbox.agent", f"--name={name}", "--pool=it-pool",
        f"--listen=unix://{socket}", f"--state-dir={state_dir}",
        f"--containerd-socket={containerd.socket}", f"--cgroup-parent={cgroup_parent}",
        f"--insecure-registry={registry.addr}", "--capacity=2", "--grace=1",
        f"--runtime={runtime_name}", f"--init-path={init}", "--log-format=json",
    ]  # fmt: skip
    proc = AgentProc(argv, f"unix://{socket}", socket, state_dir, tmp_path / "agent.log")
    try:
        yield proc
    finally:
        proc.kill()
        runtime = ContainerdRuntime(containerd.socket, "fastsandbox", [registry.addr])
        try:
            for state in await runtime.list({"fastsandbox.io/agent": name}):
                await runtime.delete(state.id, 0)
        finally:
            await runtime.close()


def target(sid: str) -> io_pb2.SandboxTarget:
    return io_pb2.SandboxTarget(sandbox_id=sid)


class Ran:
    def __init__(self, out: list[io_pb2.ExecOutput]) -> None:
        self.out = out
        self.stdout = b"".join(m.stdout for m in out)
        self.stderr = b"".join(m.stderr for m in out)
        self.code = out[-1].exited.exit_code if out[-1].WhichOneof("kind") == "exited" else None


async def run(
    stub: agent_pb2_grpc.AgentAsyncStub, sid: str, argv: list[str], *inputs: io_pb2.ExecInput,
    **start: object,
) -> Ran:  # fmt: skip
    async def gen() -> AsyncIterator[io_pb2.ExecInput]:
        yield io_pb2.ExecInput(start=io_pb2.ExecStart(target=target(sid), argv=argv, **start))  # type: ignore[arg-type]
        for i in inputs:
            yield i

    return Ran([m async for m in stub.Exec(gen(), timeout=60)])


def rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


async def make_sandbox(stub: agent_pb2_grpc.AgentAsyncStub, sid: str, image: str) -> None:
    spec = agent_pb2.SandboxRuntimeSpec(
        sandbox_id=sid,
        namespace="default",
        name=sid,
        image=image,
        command=["sh", "-c", "exec sleep 3600"],
        working_dir="/tmp",
        env=[agent_pb2.KeyValue(key="V", value="world")],
    )
    created = await stub.CreateSandbox(agent_pb2.CreateSandboxRequest(spec=spec), timeout=120)
    assert created.sandbox.state == "running"


async def test_exec_and_files(agent: AgentProc, demo_image: str, runtime_name: str) -> None:
    agent.start()
    await agent.ready()
    sid = f"it-x-{runtime_name}"
    async with agent.stub() as stub:
        await make_sandbox(stub, sid, demo_image)
        r = await run(stub, sid, ["sh", "-c", "echo hi; echo err >&2; exit 3"])
        assert (r.stdout, r.stderr, r.code) == (b"hi\n", b"err\n", 3)
        assert r.out[0].WhichOneof("kind") == "started" and r.out[0].started.pid > 1
        # env = image env + sandbox env + exec env; cwd = the sandbox's working dir.
        r = await run(
            stub,
            sid,
            ["sh", "-c", 'echo "$DEMO $V $X $(pwd)"; env | grep -c ^FSB_ || true'],
            env=[io_pb2.KeyValuePair(key="X", value="x")],
        )
        assert r.stdout == b"fastsandbox world x /tmp\n0\n", r.stderr
        r = await run(
            stub,
            sid,
            ["cat"],
            io_pb2.ExecInput(stdin=b"piped "),
            io_pb2.ExecInput(stdin=b"in"),
            io_pb2.ExecInput(close_stdin=True),
            stdin=True,
        )
        assert (r.stdout, r.code) == (b"piped in", 0)
        r = await run(stub, sid, ["tty"], pty=io_pb2.TermSize(cols=80, rows=24))
        assert r.stdout.startswith(b"/dev/pts/") and r.code == 0, r.stdout
        assert await resized_pty(stub, sid) == [(b"24", b"80"), (b"30", b"100")]
        if runtime_name == "gvisor":
            r = await run(stub, sid, ["dmesg"])
            print(f"gVisor dmesg: {r.stdout[:200]!r}")
            assert b"gVisor" in r.stdout
        r = await run(stub, sid, ["sleep", "30"], timeout_seconds=0.5)
        assert r.out[-1].exited.timed_out and r.code == 137, r.out[-1]
        r = await run(stub, sid, ["id", "-u"], user="1000")
        assert (r.stdout, r.code) == (b"1000\n", 0)
        await watch_sees_mkdir(stub, sid)
        await file_errors(stub, sid)
        await big_round_trip(stub, sid, agent, BIG)
        await stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id=sid, grace_seconds=1))
        assert not (agent.state_dir / "channels" / sid).exists()


async def resized_pty(stub: agent_pb2_grpc.AgentAsyncStub, sid: str) -> list[tuple[bytes, ...]]:
    """`stty size` before and after a resize sent once the first size was printed."""
    first_size = asyncio.Event()

    async def inputs() -> AsyncIterator[io_pb2.ExecInput]:
        start = io_pb2.ExecStart(
            target=target(sid),
            argv=["sh", "-c", "stty size; read x; stty size"],
            pty=io_pb2.TermSize(cols=80, rows=24),
            stdin=True,
        )
        yield io_pb2.ExecInput(start=start)
        await first_size.wait()
        yield io_pb2.ExecInput(resize=io_pb2.TermSize(cols=100, rows=30))
        yield io_pb2.ExecInput(stdin=b"\n")

    out = b""
    async for m in stub.Exec(inputs(), timeout=60):
        out += m.stdout
        if re.search(rb"\d+ \d+", out):
            first_size.set()
    return [tuple(x) for x in re.findall(rb"(\d+) (\d+)", out)]


async def watch_sees_mkdir(stub: agent_pb2_grpc.AgentAsyncStub, sid: str) -> None:
    call = stub.Watch(io_pb2.WatchRequest(target=target(sid), path="/tmp"))
    events: list[io_pb2.WatchEvent] = []

    async def collect() -> None:
        async for event in call:
            events.append(event)
            if event.event == "create" and event.path.startswith("/tmp/watched-"):
                return

    seen = asyncio.ensure_future(collect())
    try:
        # The watch is in place some time after the call starts: mkdir until a create shows
        # (a mkdir may also report chmod, for the mode applied after it).
        for i in range(100):
            path = f"/tmp/watched-{i}"
            await stub.FileOp(io_pb2.FileOpRequest(target=target(sid), op="mkdir", path=path))
            done, _ = await asyncio.wait({seen}, timeout=0.5)
            if done:
                seen.result()
                return
        pytest.fail(f"the watch of /tmp saw no mkdir; events: {events}")
    finally:
        seen.cancel()
        call.cancel()


async def file_errors(stub: agent_pb2_grpc.AgentAsyncStub, sid: str) -> None:
    def op(**kw: object) -> io_pb2.FileOpRequest:
        return io_pb2.FileOpRequest(target=target(sid), **kw)  # type: ignore[arg-type]

    assert (await stub.FileOp(op(op="mkdir", path="/tmp/d/e", recursive=True))).created
    listed = await stub.FileOp(op(op="list", path="/tmp/d", depth=2))
    assert [e.path for e in listed.entries] == ["/tmp/d/e"]
    moved = await stub.FileOp(op(op="move", path="/tmp/d", destination="/tmp/m"))
    assert moved.entries[0].path == "/tmp/m"
    for request, code, path in [
        (op(op="stat", path="/tmp/d"), grpc.StatusCode.NOT_FOUND, "/tmp/d"),
        (op(op="list", path="/nope"), grpc.StatusCode.NOT_FOUND, "/nope"),
        (op(op="remove", path="/tmp/gone"), grpc.StatusCode.NOT_FOUND, "/tmp/gone"),
        (op(op="move", path="/tmp/x1", destination="/x2"), grpc.StatusCode.NOT_FOUND, "/tmp/x1"),
        (op(op="stat", path="relative"), grpc.StatusCode.INVALID_ARGUMENT, "relative"),
    ]:  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.FileOp(request)
        assert err.value.code() == code, err.value.details()
        assert path in str(err.value.details()), err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.ReadFile(io_pb2.ReadFileRequest(target=target(sid), path="/tmp/m")):
            pass
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "/tmp/m" in str(err.value.details())
    await stub.FileOp(op(op="remove", path="/tmp/m", recursive=True))


async def big_round_trip(
    stub: agent_pb2_grpc.AgentAsyncStub, sid: str, agent: AgentProc, size: int
) -> None:
    assert agent.proc is not None
    pid = agent.proc.pid
    before = rss(pid)
    block = hashlib.sha256(b"seed").digest() * (MiB // 32)
    sent = hashlib.sha256()

    async def upload() -> AsyncIterator[io_pb2.WriteFileInput]:
        header = io_pb2.WriteFileHeader(target=target(sid), path="/tmp/big/file.bin", parents=True)
        yield io_pb2.WriteFileInput(header=header)
        for i in range(size // MiB):
            chunk = bytes([i % 251]) + block[1:]
            sent.update(chunk)
            yield io_pb2.WriteFileInput(data=chunk)

    written = await stub.WriteFile(upload(), timeout=600)
    after_write = rss(pid, "VmHWM")
    assert written.entry.size == size and written.entry.mode == 0o644
    got, n = hashlib.sha256(), 0
    async for chunk in stub.ReadFile(
        io_pb2.ReadFileRequest(target=target(sid), path="/tmp/big/file.bin"), timeout=600
    ):
        assert len(chunk.data) <= 256 * 1024
        got.update(chunk.data)
        n += len(chunk.data)
    assert n == size and got.hexdigest() == sent.hexdigest()
    r = await run(stub, sid, ["sha256sum", "/tmp/big/file.bin"])
    assert r.stdout.split()[0].decode() == sent.hexdigest()
    peak = rss(pid, "VmHWM")
    print(
        f"{size // MiB} MiB up+down: agent RSS before {before / MiB:.1f} MiB, peak after the "
        f"upload {after_write / MiB:.1f} MiB, after the download {peak / MiB:.1f} MiB, "
        f"growth {(peak - before) / MiB:.1f} MiB (budget 64)"
    )
    assert peak - before < RSS_BUDGET


async def test_agent_restart_during_exec(
    agent: AgentProc, demo_image: str, runtime_name: str
) -> None:
    agent.start()
    await agent.ready()
    sid = "it-restart"
    async with agent.stub() as stub:
        await make_sandbox(stub, sid, demo_image)

        async def inputs() -> AsyncIterator[io_pb2.ExecInput]:
            start = io_pb2.ExecStart(
                target=target(sid), argv=["sh", "-c", "echo ready; read x; echo got $x"], stdin=True
            )
            yield io_pb2.ExecInput(start=start)
            await asyncio.Event().wait()

        call = stub.Exec(inputs())
        pid = (await call.read()).started.pid
        assert (await call.read()).stdout == b"ready\n"
        assert agent.proc is not None
        os.killpg(agent.proc.pid, signal.SIGKILL)
        agent.proc.wait(10)
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
    agent.socket.unlink()  # left by the killed agent; `ready` waits for the new one
    agent.start()
    await agent.ready()
    async with agent.stub() as stub:
        states = {s.sandbox_id: s for s in (await stub.Status(agent_pb2.StatusRequest())).sandboxes}
        assert states[sid].state == "running"
        r = await run(stub, sid, ["echo", "new"])
        assert (r.stdout, r.code) == (b"new\n", 0)
        r = await run(stub, sid, [], io_pb2.ExecInput(stdin=b"it\n"), attach_pid=pid)
        assert r.stdout.endswith(b"got it\n") and r.code == 0, r.stdout
        await stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id=sid, grace_seconds=1))


def no_cmd_image(work: Path, registry_addr: str) -> str:
    """The demo image without entrypoint and cmd, pushed as nocmd:latest."""
    layout = work / "nocmd"
    shutil.copytree(build_demo_image(work), layout)
    for what in ("config.cmd", "config.entrypoint"):
        subprocess.run(
            ["umoci", "config", "--image", f"{layout}:latest", f"--clear={what}"],
            check=True,
            capture_output=True,
        )
    return push_image(layout, registry_addr, "nocmd:latest")


async def test_no_command_stays_up_idle(
    agent: AgentProc, registry: RegistryProc, runtime_name: str, tmp_path: Path
) -> None:
    """An image with no entrypoint or cmd and a sandbox with no command: the supervisor alone
    keeps it up, and exec works in it."""
    if runtime_name == "gvisor":
        pytest.skip("the spec is the same under gVisor; runc covers it")
    image = await asyncio.to_thread(no_cmd_image, tmp_path, registry.addr)
    agent.start()
    await agent.ready()
    async with agent.stub() as stub:
        spec = agent_pb2.SandboxRuntimeSpec(sandbox_id="it-idle", name="it-idle", image=image)
        created = await stub.CreateSandbox(agent_pb2.CreateSandboxRequest(spec=spec), timeout=120)
        assert created.sandbox.state == "running"
        r = await run(stub, "it-idle", ["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"])
        assert r.stdout.strip() == b"/.fsb/init", r.stdout
        states = {s.sandbox_id: s for s in (await stub.Status(agent_pb2.StatusRequest())).sandboxes}
        assert states["it-idle"].state == "running"
        await stub.DeleteSandbox(
            agent_pb2.DeleteSandboxRequest(sandbox_id="it-idle", grace_seconds=5)
        )
