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

With --warm, also (same run, same server):

  create→marker (cold)  SDK `create()` called → a marker line the sandbox's own process
                        printed first appears in its log file on the host (polled every 0.2 ms
                        from a thread started before the call): the user's process is running.
                        Pool `bench`, no warm slots.
  create→marker (warm)  the same, pool `bench-warm` (--warm-slots 1 --prewarm-image IMAGE): each
                        create claims the slot refilled after the previous one (the wait for the
                        refill is outside the timed span; misses are counted and printed).
  create reply (warm)   SDK `create()` called → reply received, on the warm pool.

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


def wait_marker(logs: Path, mark: str, t0: float, bound: float = 30.0) -> float:
    """Milliseconds from `t0` until `mark` is in one of the agents' log files."""
    needle = mark.encode()
    while time.perf_counter() - t0 < bound:
        for path in logs.glob("*/logs/*.log"):
            with contextlib.suppress(OSError):
                if needle in path.read_bytes():
                    return (time.perf_counter() - t0) * 1000
        time.sleep(0.0002)
    raise RuntimeError(f"marker {mark} never appeared under {logs}")


async def wait_warm(client: AsyncClient, pool: str, bound: float = 30.0) -> None:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        got = await client.get_pool(pool)
        if any(w.ready for w in got.status.warm_slots):
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"pool {pool} never showed a ready warm slot")


async def bench_marker(
    server: Server, image: str, n: int, pool: str, warm: bool
) -> tuple[list[float], list[float], int]:
    """(create→marker ms, create reply ms, warm hits)."""
    logs = server.data_dir / "agents"
    marker_ms: list[float] = []
    reply_ms: list[float] = []
    hits = 0
    async with AsyncClient(endpoint=server.endpoint, namespace="default") as client:
        await client.create(f"warmup-{pool}", image, pool=pool, command=TRAP_SLEEP)
        await client.delete(f"warmup-{pool}", wait=True)
        for i in range(n):
            if warm:
                await wait_warm(client, pool)
            name = f"m-{pool}-{i}"
            mark = f"FSB-MARK-{name}-{os.getpid()}"
            command = ["sh", "-c", f"echo {mark}; trap 'exit 0' TERM; sleep 3600 & wait"]
            t0 = time.perf_counter()
            seen = asyncio.ensure_future(asyncio.to_thread(wait_marker, logs, mark, t0))
            result = await client.create(name, image, pool=pool, command=command)
            reply_ms.append((time.perf_counter() - t0) * 1000)
            marker_ms.append(await seen)
            hits += bool(result.timings.warm)
            await client.delete(name, wait=True)
    return marker_ms, reply_ms, hits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="samples per series")
    parser.add_argument(
        "--warm", action="store_true", help="also create→marker, warm slots against cold"
    )
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
        warm_rows: list[str] = []
        if args.warm:
            made = server.fsb(
                "pool", "create", "bench-warm", "--min", "1", "--max", "1", "--per-agent", "10",
                "--warm-slots", "1", "--prewarm-image", image,
            )  # fmt: skip
            assert made.returncode == 0, made.stderr
            cold_mark, _, _ = asyncio.run(bench_marker(server, image, args.n, "bench", False))
            warm_mark, warm_reply, hits = asyncio.run(
                bench_marker(server, image, args.n, "bench-warm", True)
            )
            warm_rows = [
                row("create→marker (cold)", cold_mark),
                row("create→marker (warm)", warm_mark),
                row("create reply (warm)", warm_reply),
                f"warm slot hits: {hits}/{args.n}",
            ]

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
        for line in warm_rows:
            print(line)
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
