"""Create latency of Fast Sandbox against `runc run -d`, `ctr run -d` and `docker run -d`.

Run as root after `scripts/setup`:  .venv/bin/python benchmarks/create_latency.py [-n 30]

It starts everything it measures on loopback and removes it afterwards: a docker-registry with
the busybox demo image, an `fsb server` with its own containerd in a temp data dir, and a pool
`bench` with one agent. Then, sequentially, n times each:

  fsb create (fast)    boundary: SDK `AsyncClient.create()` called → reply received (client
                       side, includes gRPC, auth, placement, agent create+start, SQLite write)
  fsb create (strong)  same boundary, Strong mode (record first, then start, then status write)
  server runtimeReady  the reply's `timings.runtimeReadyMs`: request arrival at the server →
                       agent confirmed the task started (no client, no record write)
  ctr run -d           `ctr run -d IMAGE ID sleep` process spawned → exited (same containerd,
                       image already unpacked; includes ctr's own start-up)
  runc run -d          `runc run -d --bundle B ID` process spawned → exited (an unpacked bundle,
                       no containerd at all: the floor for starting a container here)
  docker run -d        `docker run -d --network none IMAGE sleep` process spawned → exited, against
                       a private dockerd (Debian's docker.io) with its own containerd (skipped,
                       and said so, when docker.io is not installed)

Each sandbox is deleted before the next create, outside the timed span. Numbers are printed as
p50/p95/p99/max in milliseconds (benchmarks/peers.py).
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

from benchmarks.peers import Docker, RuncBundle, bench_ctr_run, docker_peer, row  # noqa: E402

from fastsandbox.sdk import AsyncClient  # noqa: E402
from tests.e2e._server import Server, free_port, new_server, purge  # noqa: E402

TRAP_SLEEP = ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]


async def bench_fsb(
    server: Server, image: str, n: int, mode: str
) -> tuple[list[float], list[float]]:
    client_ms: list[float] = []
    server_ms: list[float] = []
    async with AsyncClient(endpoint=server.endpoint, namespace="default") as client:
        # Warm-up: pulls the image on the agent and opens connections.
        await client.create("warm", image, pool="bench", command=TRAP_SLEEP)
        await client.delete("warm", wait=True)
        for i in range(n):
            name = f"b-{mode}-{i}"
            started = time.perf_counter()
            result = await client.create(name, image, pool="bench", command=TRAP_SLEEP, mode=mode)
            client_ms.append((time.perf_counter() - started) * 1000)
            if result.timings is not None and result.timings.runtime_ready_ms is not None:
                server_ms.append(result.timings.runtime_ready_ms)
            await client.delete(name, wait=True)
    return client_ms, server_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="samples per series")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (it starts containerd and containers)", file=sys.stderr)
        return 2
    # A timeout's SIGTERM must still run the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = Path(tempfile.mkdtemp(prefix="fsb-bench-", dir="/tmp"))
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
        made = server.fsb(
            "pool", "create", "bench", "--min", "1", "--max", "1", "--per-agent", "10"
        )
        assert made.returncode == 0, made.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = server.fsb("pool", "get", "bench", "-o", "json")
            if got.returncode == 0 and json.loads(got.stdout)["status"]["agents"]["ready"]:
                break
            time.sleep(0.2)
        # The SDK finds the server's generated token through the data dir, as the CLI does.
        os.environ["FSB_DATA_DIR"] = str(server.data_dir)

        fast, fast_server = asyncio.run(bench_fsb(server, image, args.n, "fast"))
        strong, _ = asyncio.run(bench_fsb(server, image, args.n, "strong"))
        ctr = bench_ctr_run(server.containerd_socket, image, args.n)
        runc = RuncBundle.unpack(work / "demo-image", work).bench_run(args.n)
        docker: list[float] = []
        if Docker.missing() is None:
            with docker_peer(work / "docker", work / "demo-image") as (peer, tag):
                docker = peer.bench_run(tag, args.n)

        print(
            f"\nFast Sandbox create latency, {args.n} sequential samples each "
            f"({os.cpu_count()} CPUs, busybox image cached)"
        )
        print(row("fsb create (fast)", fast))
        print(row("fsb create (strong)", strong))
        print(row("server runtimeReady", fast_server))
        print(row("ctr run -d", ctr))
        print(row("runc run -d", runc))
        if docker:
            print(row("docker run -d", docker))
        else:
            print(f"docker run -d: not measured ({Docker.missing()})")
        print("boundaries: see the docstring of benchmarks/create_latency.py")
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
