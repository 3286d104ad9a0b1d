"""Exec round-trip latency of Fast Sandbox against `runc exec` (and `docker exec`), in one run.

Run as root after `scripts/setup`:  .venv/bin/python benchmarks/exec_latency.py [-n 200]

It starts everything it measures on loopback and removes it afterwards: a docker-registry with
the busybox demo image, an `fsb server` with its own containerd in a temp data dir, a pool with
one agent, one idle sandbox (its PID 1 is the supervisor). Then, sequentially, n times each:

  sdk run("true")      boundary: SDK `AsyncSandbox.commands.run("true")` called → result
                       returned (client side: gRPC stream to the server, auth, the relay to
                       the agent, the agent → supervisor channel, `/bin/sh -c true` forked
                       and reaped in the sandbox, exit status back the same way)
  sdk run(["true"])    same, argv without a shell (the fork+exec of sh taken out)
  agent Exec direct    `Exec(["true"])` straight to the agent's unix socket (no client SDK, no
                       Fast-Path, no relay): the agent → supervisor → process part alone
  fsb Get (unary)      `AsyncClient.get()` of the same sandbox: the client → server gRPC floor
                       (auth + one store read), for where the time goes
  runc exec true       `runc exec ID true` process spawned → exited, on a container started
                       from the same image's unpacked bundle (no containerd at all)
  docker exec true     `docker exec NAME true` against a private dockerd (Debian's docker.io, its
                       own socket, data root and containerd: benchmarks/peers.py); said so, not
                       measured, when docker.io is not installed

Numbers are printed as p50/p95/p99/max in milliseconds (benchmarks/harness.py); `make bench`
checks the targets (p50 ≤ 5 ms, ≤ 0.4 x runc exec, ≤ 0.1 x docker exec) against this run's
own baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import Bench, Results, bench_server  # noqa: E402
from benchmarks.peers import Docker, RuncBundle, docker_peer  # noqa: E402
from fastsandbox import AsyncSandbox  # noqa: E402
from fastsandbox.api._proto.fastsandbox.v1 import io_pb2  # noqa: E402
from fastsandbox.control.agent_client import AgentClient  # noqa: E402
from tests.e2e._server import Server  # noqa: E402


async def bench_sdk(
    server: Server, image: str, n: int, pool: str = "bench"
) -> dict[str, list[float]]:
    token = (server.data_dir / "token").read_text().strip()
    os.environ["FSB_CA_FILE"] = str(server.ca_file)  # the server's own CA (TLS Fast-Path)
    out: dict[str, list[float]] = {'sdk run("true")': [], 'sdk run(["true"])': [], "fsb Get": []}
    async with await AsyncSandbox.create(
        image=image, pool=pool, endpoint=server.endpoint, token=token
    ) as sb:
        for _ in range(20):  # warm-up: channels, the agent's supervisor connection, caches
            await sb.commands.run("true")
        obj = await sb.refresh()
        sockets = [
            p
            for p in server.data_dir.rglob("agent.sock")
            if p.parent.name == obj.status.assigned_agent
        ]
        agent = AgentClient(f"unix:{sockets[0]}") if sockets else None
        out["agent Exec direct"] = []

        async def direct() -> None:
            assert agent is not None
            start = io_pb2.ExecStart(
                target=io_pb2.SandboxTarget(sandbox_id=obj.status.container_id), argv=["true"]
            )

            async def inputs():  # type: ignore[no-untyped-def]
                yield io_pb2.ExecInput(start=start)
                await asyncio.sleep(3600)  # keep the input side open, as the SDK does

            # Closed here, not whenever the generator is collected: an open stream keeps the
            # process's pipes in the supervisor (suspected cause of EMFILE at n=200, unverified).
            async with contextlib.aclosing(agent.exec(inputs())) as stream:
                async for msg in stream:
                    if msg.WhichOneof("kind") == "exited":
                        return

        for _ in range(n):
            if agent is not None:
                started = time.perf_counter()
                await direct()
                out["agent Exec direct"].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            r = await sb.commands.run("true")
            out['sdk run("true")'].append((time.perf_counter() - started) * 1000)
            assert r.exit_code == 0
            started = time.perf_counter()
            await sb.commands.run(["true"])
            out['sdk run(["true"])'].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await sb.client.get(sb.name)
            out["fsb Get"].append((time.perf_counter() - started) * 1000)
        if agent is not None:
            await agent.close()
    if not out["agent Exec direct"]:
        del out["agent Exec direct"]
    return out


BOUNDARIES = {
    'sdk run("true")': "SDK commands.run('true') called -> result (client, Fast-Path, relay, "
    "agent, supervisor, sh -c true)",
    'sdk run(["true"])': "same, argv without a shell",
    "agent Exec direct": "Exec straight to the agent's unix socket",
    "fsb Get": "one unary Fast-Path call: the client -> server floor",
    "runc exec true": "runc process spawned -> exited",
    "docker exec true": "docker process spawned -> exited (private dockerd)",
}


def run(bench: Bench, results: Results, n: int, docker: tuple[Docker, str] | None) -> None:
    print(f"\n== exec round trip (n={n} each, one idle sandbox)", flush=True)
    bench.pool("bench-exec", agents=1, per_agent=4)
    series = asyncio.run(bench_sdk(bench.server, bench.image, n, "bench-exec"))
    series["runc exec true"] = RuncBundle.unpack(bench.layout, bench.work).bench_exec(n)
    if docker is not None:
        peer, tag = docker
        series["docker exec true"] = peer.bench_exec(tag, n)
    else:
        results.note(f"docker exec: not measured ({Docker.missing() or 'not started'})")
    for name, values in series.items():
        results.add("exec", name, values, BOUNDARIES[name])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="samples per series")
    args = parser.parse_args()
    results = Results()
    with bench_server() as bench, contextlib.ExitStack() as stack:
        docker = None
        if Docker.missing() is None:
            docker = stack.enter_context(docker_peer(bench.work / "docker", bench.layout))
        run(bench, results, args.n, docker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
