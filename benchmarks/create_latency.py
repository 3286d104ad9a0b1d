"""Create latency: create → the user's process running, Fast and Strong, cold (and warm once
pools accept warm slots), against `runc run -d`, `ctr run -d` and `docker run -d`.

Run as root:  .venv/bin/python benchmarks/create_latency.py [-n 30]   (or all of it: make bench)

Pool `bench`, one agent, busybox cached by an untimed warm-up create; one sandbox at a time,
each deleted outside the timed span; Fast and Strong take turns, create by create. Series:

  fsb fast reply / strong reply  SDK `AsyncClient.create()` called → reply received
  fsb fast running / strong ...  SDK create called → the marker the user's process writes is seen
                                 from the host (benchmarks/harness.py, polled every 0.2 ms)
  server runtimeReadyMs (fast)   the reply's timings: request arrival → agent confirmed start
  ctr run -d / runc run -d       process spawned → exited (benchmarks/peers.py)
  docker run -d                  same, a private dockerd (Debian's docker.io)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import MARKER_CMD, Bench, Results, bench_server, wait_marker
from benchmarks.peers import Docker, RuncBundle, bench_ctr_run

SECTION = "create"


async def _series(
    bench: Bench, pool: str, n: int, modes: tuple[str, ...]
) -> dict[str, list[float]]:
    from fastsandbox.sdk import AsyncClient

    out: dict[str, list[float]] = {}
    async with AsyncClient(endpoint=bench.server.endpoint, namespace="default") as client:
        # Warm-up: pulls the image on the agent and opens connections.
        await client.create(f"{pool}-warmup", bench.image, pool=pool, command=MARKER_CMD)
        await client.delete(f"{pool}-warmup", wait=True)
        for i in range(n):
            for mode in modes:
                name = f"{pool}-{mode}-{i}"
                started = time.perf_counter()
                made = await client.create(
                    name, bench.image, pool=pool, command=MARKER_CMD, mode=mode
                )
                replied = time.perf_counter()
                seen = await asyncio.to_thread(wait_marker, bench.marker(made.container_id))
                out.setdefault(f"{mode} reply", []).append((replied - started) * 1000)
                if seen is not None:
                    out.setdefault(f"{mode} running", []).append((seen - started) * 1000)
                ready = made.timings.runtime_ready_ms if made.timings else None
                if ready is not None:
                    out.setdefault(f"{mode} server runtimeReadyMs", []).append(ready)
                await client.delete(name, wait=True)
    return out


BOUNDARY = {
    "reply": "SDK create() called -> reply received",
    "running": "SDK create() called -> user process's marker seen on the host",
    "server runtimeReadyMs": "server: request arrival -> agent confirmed the task started",
}


def _report(results: Results, label: str, series: dict[str, list[float]]) -> None:
    for key, values in series.items():
        mode, _, what = key.partition(" ")
        results.add(SECTION, f"{label} {key}", values, f"{BOUNDARY[what]} ({mode} mode)")


def run(bench: Bench, results: Results, n: int, docker: tuple[Docker, str] | None) -> None:
    print(f"\n== create -> user process running (n={n} each, one at a time)", flush=True)
    bench.pool("bench", agents=1, per_agent=10)
    _report(results, "cold", asyncio.run(_series(bench, "bench", n, ("fast", "strong"))))
    refused = bench.try_pool("bench-warm", "--min", "1", "--max", "1", "--warm-slots", "2")
    if refused:
        results.note(f"warm: not measured (pools refuse warmSlots > 0 here: {refused})")
    else:
        bench.pool("bench-warm", agents=1, per_agent=10)
        time.sleep(2.0)  # let the agent fill its slots, off the timed span
        _report(results, "warm", asyncio.run(_series(bench, "bench-warm", n, ("fast",))))
    sock = bench.server.containerd_socket
    results.add(SECTION, "ctr run -d", bench_ctr_run(sock, bench.image, n),
                "ctr process spawned -> exited (same containerd, image unpacked)")  # fmt: skip
    runc = RuncBundle.unpack(bench.layout, bench.work)
    results.add(SECTION, "runc run -d", runc.bench_run(n),
                "runc process spawned -> exited (unpacked bundle, no containerd)")  # fmt: skip
    if docker is None:
        results.note(f"docker run -d: not measured ({Docker.missing() or 'not started'})")
    else:
        peer, tag = docker
        boundary = "docker process spawned -> exited (private dockerd, --network none)"
        results.add(SECTION, "docker run -d", peer.bench_run(tag, n), boundary)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="samples per series")
    args = parser.parse_args()
    results = Results()
    with bench_server() as bench, contextlib.ExitStack() as stack:
        docker = None
        if Docker.missing() is None:
            from benchmarks.peers import docker_peer

            docker = stack.enter_context(docker_peer(bench.work / "docker", bench.layout))
        run(bench, results, args.n, docker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
