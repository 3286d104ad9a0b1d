"""The real agent process (`python -m fastsandbox.agent`) on a real containerd and registry:
create, logs, exit codes and delete over gRPC, and an agent restarted finds its sandbox still
running (sandboxes belong to containerd's shims, not to the agent process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2, agent_pb2_grpc
from tests.infra import ContainerdProc, RegistryProc

pytestmark = pytest.mark.integration

# Bounds for waiting on real processes; generous because the machine may be busy.
READY_TIMEOUT = 30.0
OUTPUT_TIMEOUT = 20.0


@dataclass
class AgentProc:
    argv: list[str]
    listen: str
    socket: Path
    state_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    async def ready(self) -> None:
        """The agent makes its socket only once it serves; then one Status must answer."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"agent did not start (exit {self.proc.poll()}): {self.tail()}")
            await asyncio.sleep(0.05)
        async with self.stub() as stub:
            await stub.Status(agent_pb2.StatusRequest(), timeout=READY_TIMEOUT)

    @contextlib.asynccontextmanager
    async def stub(self) -> AsyncIterator[agent_pb2_grpc.AgentAsyncStub]:
        channel = grpc.aio.insecure_channel(self.listen)
        try:
            yield agent_pb2_grpc.AgentStub(channel)
        finally:
            await channel.close(None)

    def stop(self) -> int:
        """SIGTERM, as the fleet does; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(READY_TIMEOUT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="fsb-agent-it-", dir="/tmp"))
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
) -> AsyncIterator[AgentProc]:
    name = f"it-agent-{uuid.uuid4().hex[:8]}"
    socket = sock_dir / "agent.sock"
    state_dir = tmp_path / "state"
    argv = [
        sys.executable,
        "-m",
        "fastsandbox.agent",
        f"--name={name}",
        "--pool=it-pool",
        f"--listen=unix://{socket}",
        f"--state-dir={state_dir}",
        f"--containerd-socket={containerd.socket}",
        f"--cgroup-parent={cgroup_parent}",
        f"--insecure-registry={registry.addr}",
        "--capacity=2",
        "--grace=1",
        "--log-format=json",
        "--log-level=debug",
    ]
    agent = AgentProc(argv, f"unix://{socket}", socket, state_dir, tmp_path / "agent.log")
    try:
        yield agent
    finally:
        agent.kill()
        # Whatever the test left behind (it failed half-way): remove this agent's containers.
        runtime = ContainerdRuntime(containerd.socket, "fastsandbox", [registry.addr])
        try:
            for state in await runtime.list({"fastsandbox.io/agent": name}):
                await runtime.delete(state.id, 0)
        finally:
            await runtime.close()


def spec(sandbox_id: str, image: str, script: str) -> agent_pb2.SandboxRuntimeSpec:
    return agent_pb2.SandboxRuntimeSpec(
        sandbox_id=sandbox_id,
        namespace="default",
        name=sandbox_id,
        image=image,
        command=["sh", "-c", script],
        env=[agent_pb2.KeyValue(key="V", value="world")],
        working_dir="/tmp",
    )


async def read_logs(
    stub: agent_pb2_grpc.AgentAsyncStub, sandbox_id: str, *, follow: bool = False
) -> bytes:
    call = stub.Logs(agent_pb2.SandboxLogsRequest(sandbox_id=sandbox_id, follow=follow))
    return b"".join([chunk.data async for chunk in call])


async def logs_until(stub: agent_pb2_grpc.AgentAsyncStub, sandbox_id: str, want: bytes) -> bytes:
    deadline = time.monotonic() + OUTPUT_TIMEOUT
    while want not in (got := await read_logs(stub, sandbox_id)):
        if time.monotonic() > deadline:
            pytest.fail(f"{sandbox_id} logs never showed {want!r}; got {got!r}")
        await asyncio.sleep(0.1)
    return got


async def status_by_id(stub: agent_pb2_grpc.AgentAsyncStub) -> dict[str, agent_pb2.SandboxState]:
    reply = await stub.Status(agent_pb2.StatusRequest())
    return {s.sandbox_id: s for s in reply.sandboxes}


async def test_agent_process_end_to_end_and_restart(
    agent: AgentProc, containerd: ContainerdProc, demo_image: str
) -> None:
    agent.start()
    await agent.ready()
    async with agent.stub() as stub:
        status = await stub.Status(agent_pb2.StatusRequest())
        assert (status.pool, status.capacity, list(status.sandboxes)) == ("it-pool", 2, [])
        assert stat_mode(agent.socket) == 0o600

        # The image is pulled by the create itself (not cached yet).
        created = await stub.CreateSandbox(
            agent_pb2.CreateSandboxRequest(
                spec=spec("it-long", demo_image, "echo hello $V; pwd; exec sleep 300")
            )
        )
        assert created.sandbox.state == "running"
        assert created.sandbox.pid > 0
        await stub.CreateSandbox(
            agent_pb2.CreateSandboxRequest(spec=spec("it-short", demo_image, "echo bye; exit 3"))
        )
        assert (await logs_until(stub, "it-long", b"/tmp\n")) == b"hello world\n/tmp\n"
        # Following an exiting sandbox ends by itself once its output is read.
        followed = await asyncio.wait_for(read_logs(stub, "it-short", follow=True), OUTPUT_TIMEOUT)
        assert followed == b"bye\n"
        states = await status_by_id(stub)
        assert (states["it-short"].exited, states["it-short"].exit_code) == (True, 3)
        assert (states["it-long"].state, states["it-long"].exited) == ("running", False)
        assert demo_image in (await stub.Status(agent_pb2.StatusRequest())).images

    # Agent stop never stops sandboxes; the next agent of the same name adopts them.
    assert agent.stop() == 0
    assert not agent.socket.exists()
    agent.start()
    await agent.ready()
    async with agent.stub() as stub:
        states = await status_by_id(stub)
        assert states["it-long"].state == "running"
        assert states["it-long"].pid == created.sandbox.pid
        assert states["it-short"].exit_code == 3
        assert (await read_logs(stub, "it-long")) == b"hello world\n/tmp\n"

        # Capacity counts the adopted running sandbox: one more fits, a second does not.
        await stub.CreateSandbox(
            agent_pb2.CreateSandboxRequest(spec=spec("it-extra", demo_image, "exec sleep 300"))
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateSandbox(
                agent_pb2.CreateSandboxRequest(spec=spec("it-over", demo_image, "sleep 1"))
            )
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

        for sandbox_id in ("it-long", "it-short", "it-extra"):
            reply = await stub.DeleteSandbox(
                agent_pb2.DeleteSandboxRequest(sandbox_id=sandbox_id, grace_seconds=0.5)
            )
            assert reply.existed, sandbox_id
            assert not (agent.state_dir / "logs" / f"{sandbox_id}.log").exists()
        again = await stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id="it-long"))
        assert not again.existed
        assert await status_by_id(stub) == {}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await read_logs(stub, "it-long")
        assert err.value.code() is grpc.StatusCode.NOT_FOUND

    leftovers = containerd.ctr("containers", "ls", "-q").split()
    assert not {"it-long", "it-short", "it-extra"} & set(leftovers)
    snapshots = containerd.ctr("snapshots", "ls")
    assert "it-long" not in snapshots
    assert agent.stop() == 0


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
