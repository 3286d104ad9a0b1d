"""Exec round trip through the agent (gRPC `Exec` → supervisor → fork/exec → exit) against
`runc exec` of the same command, interleaved in one run. Needs root (containerd, runc).

Run:  flock /tmp/fsb-infra.lock .venv/bin/python benchmarks/agent_exec.py [-n 200]

It starts a private containerd and loopback registry (tests/infra.py), the real agent process
(`python -m fastsandbox.agent`, runc, `native/bin/fsb-supervisor` as every sandbox's PID 1),
creates one sandbox, and measures, n times each, alternating:

  agent Exec true   boundary: the gRPC Exec call opened on the agent's unix socket with its
                    `start` message → the `exited` message received. Includes the agent's
                    state check, the control request, the data connection's dial + handshake,
                    fork + execve in the sandbox, the exit report, and both gRPC hops.
  runc exec true    baseline: `runc exec ID true` spawned → exited, into a plain runc
                    container of the same image (no containerd), as peers.py measures it.

Milliseconds, p50/p95/p99/max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from benchmarks.peers import RuncBundle, row, timed  # noqa: E402
from fastsandbox.agent.init_binary import find_init  # noqa: E402
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2, agent_pb2_grpc, io_pb2  # noqa: E402
from tests.infra import (  # noqa: E402
    build_demo_image,
    push_image,
    remove_cgroup,
    start_containerd,
    start_registry,
)
from tests.integration.test_agent_process import AgentProc  # noqa: E402

SID = "bench-exec"


async def agent_exec(stub: agent_pb2_grpc.AgentStub) -> float:
    async def inputs():  # type: ignore[no-untyped-def]
        yield io_pb2.ExecInput(
            start=io_pb2.ExecStart(target=io_pb2.SandboxTarget(sandbox_id=SID), argv=["true"])
        )

    t0 = time.perf_counter()
    async for m in stub.Exec(inputs()):
        if m.WhichOneof("kind") == "exited":
            if m.exited.exit_code != 0:
                raise RuntimeError(f"true exited {m.exited.exit_code}")
            return (time.perf_counter() - t0) * 1000
    raise RuntimeError("Exec ended without an exit")


async def main(n: int) -> None:
    init = find_init()
    if init is None or "supervisor" not in init.name:
        raise SystemExit("needs native/bin/fsb-supervisor (scripts/setup)")
    work = Path(tempfile.mkdtemp(prefix="fsb-bench-exec-", dir="/tmp"))
    ctd = start_containerd(work)
    reg = start_registry(work)
    cgroup = f"/fsb-bench-{uuid.uuid4().hex[:6]}"
    layout = build_demo_image(work)
    image = push_image(layout, reg.addr)
    sock = work / "agent.sock"
    argv = [
        sys.executable,
        "-m",
        "fastsandbox.agent",
        "--name=bench-agent",
        "--pool=bench",
        f"--listen=unix://{sock}",
        f"--state-dir={work / 'state'}",
        f"--containerd-socket={ctd.socket}",
        f"--cgroup-parent={cgroup}",
        f"--insecure-registry={reg.addr}",
        "--capacity=2",
        "--grace=1",
        f"--init-path={init}",
        "--log-level=warning",
    ]
    agent = AgentProc(argv, f"unix://{sock}", sock, work / "state", work / "agent.log")
    runc = RuncBundle.unpack(layout, work)
    try:
        agent.start()
        await agent.ready()
        channel = grpc.aio.insecure_channel(agent.listen)
        stub = agent_pb2_grpc.AgentStub(channel)
        spec = agent_pb2.SandboxRuntimeSpec(
            sandbox_id=SID, image=image, command=["sleep", "3600"], name=SID
        )
        await stub.CreateSandbox(agent_pb2.CreateSandboxRequest(spec=spec), timeout=120)
        for _ in range(5):  # warm: the supervisor's first dial, the agent's caches
            await agent_exec(stub)
        ours: list[float] = []
        theirs: list[float] = []
        cid = f"bench-runc-exec-{uuid.uuid4().hex[:6]}"
        # Blocking is fine here: the agent is another process and nothing else runs on this loop.
        subprocess.run(runc.runc("run", "-d", "--bundle", str(runc.bundle), cid), check=True)  # noqa: ASYNC221
        try:
            for _ in range(n):
                ours.append(await agent_exec(stub))
                theirs.append(timed(runc.runc("exec", cid, "true")))
        finally:
            runc.kill(cid)
        print(f"exec round trip, n={n} each, interleaved ({time.strftime('%Y-%m-%d %H:%M')})")
        print(row("agent Exec true", ours))
        print(row("runc exec true", theirs))
        ratio = sorted(ours)[len(ours) // 2] / sorted(theirs)[len(theirs) // 2]
        print(f"p50 ratio agent/runc: {ratio:.2f}")
        await stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id=SID, grace_seconds=0))
        await channel.close()
    finally:
        agent.kill()
        with contextlib.suppress(Exception):
            ctd.remove_all_containers()
        ctd.stop()
        reg.stop()
        remove_cgroup(cgroup)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=200)
    asyncio.run(main(parser.parse_args().n))
