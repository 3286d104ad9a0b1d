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

Numbers are printed as p50/p95/p99/max in milliseconds, with the targets of issue 9
(p50 ≤ 5 ms, ≤ 0.4 x runc exec, ≤ 0.1 x docker exec) checked against this run's own baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peers import Docker, RuncBundle, docker_peer, pct, row  # noqa: E402

from fastsandbox import AsyncSandbox  # noqa: E402
from fastsandbox.api._proto.fastsandbox.v1 import io_pb2  # noqa: E402
from fastsandbox.control.agent_client import AgentClient  # noqa: E402
from tests.e2e._server import Server, free_port, new_server, purge  # noqa: E402


async def bench_sdk(server: Server, image: str, n: int) -> dict[str, list[float]]:
    token = (server.data_dir / "token").read_text().strip()
    os.environ["FSB_CA_FILE"] = str(server.ca_file)  # the server's own CA (TLS Fast-Path)
    out: dict[str, list[float]] = {'sdk run("true")': [], 'sdk run(["true"])': [], "fsb Get": []}
    async with await AsyncSandbox.create(
        image=image, pool="bench", endpoint=server.endpoint, token=token
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

            async for msg in agent.exec(inputs()):
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="samples per series")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (it starts containerd and containers)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = Path(tempfile.mkdtemp(prefix="fsb-bench-exec-", dir="/tmp"))
    registry_addr = f"127.0.0.1:{free_port()}"
    server = new_server(registry_addr)
    try:
        subprocess.run(
            [str(ROOT / "scripts/demo-registry"), str(work), registry_addr],
            check=True,
            capture_output=True,
        )
        image = f"{registry_addr}/busybox:latest"
        server.start()
        made = server.fsb("pool", "create", "bench", "--min", "1", "--max", "1")
        assert made.returncode == 0, made.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = server.fsb("pool", "get", "bench", "-o", "json")
            if got.returncode == 0 and json.loads(got.stdout)["status"]["agents"]["ready"]:
                break
            time.sleep(0.2)

        series = asyncio.run(bench_sdk(server, image, args.n))
        series["runc exec true"] = RuncBundle.unpack(work / "demo-image", work).bench_exec(args.n)
        docker = Docker.missing() is None
        if docker:
            with docker_peer(work / "docker", work / "demo-image") as (peer, tag):
                series["docker exec true"] = peer.bench_exec(tag, args.n)

        print(
            f"\nExec round-trip latency, {args.n} sequential samples each "
            f"({os.cpu_count()} CPUs; boundaries in the docstring of benchmarks/exec_latency.py)"
        )
        for name, values in series.items():
            print(row(name, values))
        if not docker:
            print(f"docker exec true: not measured ({Docker.missing()})")
        sdk50 = pct(series['sdk run("true")'], 50)
        runc50 = pct(series["runc exec true"], 50)
        print(
            f"\ntarget p50 <= 5 ms:          {sdk50:.1f} ms -> {'met' if sdk50 <= 5 else 'MISSED'}"
        )
        print(
            f"target <= 0.4 x runc exec:   {sdk50 / runc50:.2f} x -> "
            f"{'met' if sdk50 <= 0.4 * runc50 else 'MISSED'}"
        )
        if docker:
            d50 = pct(series["docker exec true"], 50)
            print(
                f"target <= 0.1 x docker exec: {sdk50 / d50:.2f} x -> "
                f"{'met' if sdk50 <= 0.1 * d50 else 'MISSED'}"
            )
    finally:
        purge(server)
        with contextlib.suppress(Exception):
            out = subprocess.run(
                ["pgrep", "-f", f"{work}/registry/config.yml"], capture_output=True, text=True
            ).stdout.split()
            for pid in out:
                os.kill(int(pid), signal.SIGTERM)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
