"""Where an exec's CPU goes, per process, without containerd (no root, no lock needed).

Run after `scripts/setup`:  .venv/bin/python benchmarks/exec_cpu.py [-n 300] [--rounds 3]

Three processes as in production, each with the real code of its hop: this process is the
client (`AsyncCommands.run(["true"])` over the SDK); an `fsb server` stand-in serves the real
Fast-Path behind the real `Throttle` + `AccessGuard` (admin token) and relays with the real
`IoRelayRpcs` (the sandbox lookup answered from memory, plaintext on loopback); an agent stand-in
serves the real `IoMethods` on a unix socket over the real `ChannelHub`, whose supervisor is
`native/bin/fsb-supervisor` as a plain child (not PID 1, no container: `true` is the host's).

Per round it prints the exec p50/p95 (call → result) and the CPU each process spent per exec
(utime+stime from /proc, the supervisor's reaped children included): on a shared machine the
latency follows the CPU the four processes need more than anything else. Baselines for the
latency are benchmarks/exec_latency.py's (this one has no container, so no `runc exec`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SID = "ctr-bench"
TOKEN = "bench-admin-token-0123456789"


def cpu_ms(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK") * 1000


async def agent(sock: str, state: str) -> None:
    import grpc

    from fastsandbox.agent.io_service import IoMethods
    from fastsandbox.agent.runtime.base import ProcessDefaults
    from fastsandbox.agent.server import SERVER_OPTIONS
    from fastsandbox.agent.supervisor import ChannelHub, SupervisorClient
    from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2_grpc

    hub = ChannelHub(Path(state))
    await hub.open(SID)
    env = {**os.environ, **dict(hub.supervisor_env(SID)), "FSB_CHANNEL": str(hub.directory(SID))}
    sup = subprocess.Popen([str(ROOT / "native/bin/fsb-supervisor")], env=env)  # noqa: ASYNC220
    print(sup.pid, flush=True)

    class Manager:
        async def supervisor(self, sandbox_id: str) -> tuple[SupervisorClient, ProcessDefaults]:
            client = hub.client(SID)
            assert client is not None
            return client, ProcessDefaults(env=("PATH=/usr/bin:/bin",), cwd="/")

    class Service(IoMethods, agent_pb2_grpc.AgentServicer):  # type: ignore[misc]
        manager: Any = Manager()

    server = grpc.aio.server(options=SERVER_OPTIONS)
    agent_pb2_grpc.add_AgentServicer_to_server(Service(), server)
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    await asyncio.Event().wait()


async def fastpath(port: int, agent_sock: str) -> None:
    from datetime import UTC, datetime

    from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2_grpc
    from fastsandbox.api.models import ObjectMeta, Sandbox, SandboxPhase, SandboxSpec, SandboxStatus
    from fastsandbox.control.agent_client import AgentClients
    from fastsandbox.control.fastpath.access import AccessGuard
    from fastsandbox.control.fastpath.authz import NamespaceAuthorizer, TokenAuthenticator
    from fastsandbox.control.fastpath.io_relay import IoRelayRpcs
    from fastsandbox.control.fastpath.serve import start_fastpath

    record = Sandbox(
        metadata=ObjectMeta(
            name="sb", namespace="default", uid="u", creation_timestamp=datetime.now(UTC)
        ),
        spec=SandboxSpec.model_validate({"image": "busybox", "poolRef": "p"}),
        status=SandboxStatus(phase=SandboxPhase.RUNNING, assigned_agent="a1", container_id=SID),
    )  # fmt: skip

    class Agent:
        name, target, unready_since = "a1", f"unix:{agent_sock}", None

    class Registry:
        def get_agent(self, name: str) -> Agent:
            return Agent()

        def agents(self) -> list[Agent]:
            return [Agent()]

    class Sandboxes:
        registry, agents = Registry(), AgentClients()

        async def get(self, namespace: str, name: str) -> Sandbox:
            return record.model_copy(deep=True)

    class NoTokens:
        async def get(self, ident: str) -> None:
            return None

    class Service(IoRelayRpcs, fastpath_pb2_grpc.FastPathServicer):  # type: ignore[misc]
        sandboxes: Any = Sandboxes()

    guard = AccessGuard(TokenAuthenticator(TOKEN, NoTokens()), NamespaceAuthorizer())  # type: ignore[arg-type]
    server = await start_fastpath(Service(), guard, f"127.0.0.1:{port}", None)
    print("up", flush=True)
    await server.wait_for_termination()


async def client(port: int, pids: dict[str, int], n: int, rounds: int) -> None:
    from benchmarks.peers import pct
    from fastsandbox.sdk.aio import AsyncClient
    from fastsandbox.sdk.commands import AsyncCommands

    async with AsyncClient(endpoint=f"127.0.0.1:{port}", token=TOKEN, insecure=True) as c:
        commands = AsyncCommands(c, "default", "sb")
        for _ in range(50):  # warm-up: channels, the parked data connections
            assert (await commands.run(["true"])).exit_code == 0
        for _ in range(rounds):
            before = {k: cpu_ms(p) for k, p in pids.items()}
            mine = time.process_time()
            took = []
            for _ in range(n):
                t0 = time.perf_counter()
                await commands.run(["true"])
                took.append((time.perf_counter() - t0) * 1000)
            spent = {k: (cpu_ms(p) - before[k]) / n for k, p in pids.items()}
            per = " ".join(f"{k} {v:.2f}" for k, v in spent.items())
            print(
                f"exec p50 {pct(took, 50):6.2f} p95 {pct(took, 95):6.2f} ms | CPU ms per exec: "
                f"client {(time.process_time() - mine) * 1000 / n:.2f} {per}",
                flush=True,
            )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--agent":
        asyncio.run(agent(sys.argv[2], sys.argv[3]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--fastpath":
        asyncio.run(fastpath(int(sys.argv[2]), sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="execs per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from tests.e2e._server import free_port

    with tempfile.TemporaryDirectory(prefix="fsb-exec-cpu-") as tmp:
        sock, port = f"{tmp}/agent.sock", free_port()
        me = [sys.executable, __file__]
        a = subprocess.Popen(
            [*me, "--agent", sock, f"{tmp}/state"], stdout=subprocess.PIPE, text=True
        )
        assert a.stdout is not None
        sup = int(a.stdout.readline())
        f = subprocess.Popen(
            [*me, "--fastpath", str(port), sock], stdout=subprocess.PIPE, text=True
        )
        assert f.stdout is not None
        f.stdout.readline()
        try:
            pids = {"server": f.pid, "agent": a.pid, "supervisor": sup}
            asyncio.run(client(port, pids, args.n, args.rounds))
        finally:
            for p in (f, a):
                p.kill()
                p.wait()
            os.kill(sup, 9)
    return 0


if __name__ == "__main__":
    sys.exit(main())
