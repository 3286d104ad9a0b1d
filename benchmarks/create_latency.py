"""Create latency: create → the user's process running, Fast and Strong, cold and warm (a pool
with warm slots), against `runc run -d`, `ctr run -d` and `docker run -d`.

Run as root:  .venv/bin/python benchmarks/create_latency.py [-n 30]   (or all of it: make bench)

Pool `bench`, one agent, busybox cached by an untimed warm-up create; one sandbox at a time,
each deleted outside the timed span; Fast and Strong take turns, create by create. Series:

  fsb fast reply / strong reply  SDK `AsyncClient.create()` called → reply received
  fsb fast running / strong ...  SDK create called → the marker the user's process writes is seen
                                 from the host (benchmarks/harness.py, polled every 0.2 ms)
  server runtimeReadyMs (fast)   the reply's timings: request arrival → agent confirmed start
  warm ...                       the same, Fast and Strong, on pool `bench-warm` (--warm-slots
                                 1, the image prewarmed): each create waits, untimed, for a
                                 ready slot, and the marker is looked for in the ready slots'
                                 rootfs (a claimed slot keeps its own container id); only claims
                                 are samples, misses are counted in a note
  cold/warm 1 port ...           Fast, declaring port 8080 (published by DNAT on the agent's
                                 address: one iptables-restore on the request path, cold and warm)
  warm shared network ...        warm on pool `bench-warm-shared` (networkMode shared): a claim
                                 with no network step, for comparison
Both pools are private (`networkMode: private`, the default: a network namespace per sandbox; a
warm slot is made in one of its own), so cold and warm pay the same network steps.
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

from benchmarks.harness import MARKER_CMD, Bench, Results, bench_server, wait_marker, wait_slot
from benchmarks.peers import Docker, RuncBundle, bench_ctr_run

SECTION = "create"


async def _series(
    bench: Bench,
    pool: str,
    n: int,
    modes: tuple[str, ...],
    warm: bool = False,
    ports: tuple[int, ...] = (),
) -> dict[str, list[float]]:
    from fastsandbox.sdk import AsyncClient

    out: dict[str, list[float]] = {}
    hits = misses = 0
    async with AsyncClient(endpoint=bench.server.endpoint, namespace="default") as client:
        # Warm-up: pulls the image on the agent and opens connections.
        await client.create(f"{pool}-warmup", bench.image, pool=pool, command=MARKER_CMD)
        await client.delete(f"{pool}-warmup", wait=True)
        # Warm: only creates that claimed a slot are samples (a miss, when the refill was not
        # done yet, is counted and retried), up to 3n attempts.
        for i in range(3 * n if warm else n):
            if warm and hits >= n * len(modes):
                break
            for mode in modes:
                name = f"{pool}-{mode}-{'p' if ports else ''}{i}"
                slots: list[Path] = []
                if warm:
                    await wait_slot(client, pool)
                    # The pool's status lags the agent by a heartbeat: give the refill time.
                    await asyncio.sleep(0.3)
                    slots = bench.slot_markers()
                started = time.perf_counter()
                made = await client.create(
                    name, bench.image, pool=pool, command=MARKER_CMD, mode=mode, ports=ports
                )
                replied = time.perf_counter()
                marker = bench.marker(made.container_id)
                seen = await asyncio.to_thread(wait_marker, [marker] if marker else slots)
                if warm and not (made.timings and made.timings.warm):
                    misses += 1
                    await client.delete(name, wait=True)
                    continue
                hits += 1
                out.setdefault(f"{mode} reply", []).append((replied - started) * 1000)
                if seen is not None:
                    out.setdefault(f"{mode} running", []).append((seen - started) * 1000)
                ready = made.timings.runtime_ready_ms if made.timings else None
                if ready is not None:
                    out.setdefault(f"{mode} server runtimeReadyMs", []).append(ready)
                await client.delete(name, wait=True)
    if warm:
        out["misses"] = [float(misses)]
    return out


BOUNDARY = {
    "reply": "SDK create() called -> reply received",
    "running": "SDK create() called -> user process's marker seen on the host",
    "server runtimeReadyMs": "server: request arrival -> agent confirmed the task started",
}


def _report(results: Results, label: str, series: dict[str, list[float]]) -> None:
    misses = series.pop("misses", None)
    if misses is not None:
        hits = len(next(iter(series.values()), []))
        results.note(
            f"{label}: {hits} creates claimed a warm slot (the samples); {int(misses[0])} found "
            "none ready (refill not done) and were not counted"
        )
    for key, values in series.items():
        mode, _, what = key.partition(" ")
        results.add(SECTION, f"{label} {key}", values, f"{BOUNDARY[what]} ({mode} mode)")


def run(bench: Bench, results: Results, n: int, docker: tuple[Docker, str] | None) -> None:
    print(f"\n== create -> user process running (n={n} each, one at a time)", flush=True)
    bench.pool("bench", agents=1, per_agent=10)
    _report(results, "cold", asyncio.run(_series(bench, "bench", n, ("fast", "strong"))))
    port = (8080,)
    _report(results, "cold 1 port", asyncio.run(_series(bench, "bench", n, ("fast",), ports=port)))
    # Private as the cold pool: each slot is made in a network namespace of its own.
    bench.pool("bench-warm", "--warm-slots", "1", "--prewarm-image", bench.image)
    # Strong beside Fast on warm claims too: a cold create's spread (p95 about 1.5 x p50) hides a
    # difference of a few ms; a claim's does not.
    warm = asyncio.run(_series(bench, "bench-warm", n, ("fast", "strong"), warm=True))
    _report(results, "warm", warm)
    warm = asyncio.run(_series(bench, "bench-warm", n, ("fast",), warm=True, ports=port))
    _report(results, "warm 1 port", warm)
    # What a claim costs without any network step: the same, the sandboxes on the agent's net.
    bench.pool(
        "bench-warm-shared", "--warm-slots", "1", "--prewarm-image", bench.image,
        "--network-mode", "shared",
    )  # fmt: skip
    warm = asyncio.run(_series(bench, "bench-warm-shared", n, ("fast",), warm=True))
    _report(results, "warm shared network", warm)
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


def run_cold(bench: Bench, results: Results, n: int) -> None:
    """The cold series alone (Fast), then `runc run -d` in the same run for the ratio."""
    print(f"\n== cold create -> user process running (n={n}, one at a time)", flush=True)
    bench.pool("bench", agents=1, per_agent=10)
    _report(results, "cold", asyncio.run(_series(bench, "bench", n, ("fast",))))
    runc = RuncBundle.unpack(bench.layout, bench.work)
    results.add(SECTION, "runc run -d", runc.bench_run(n),
                "runc process spawned -> exited (unpacked bundle, no containerd)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="samples per series")
    parser.add_argument(
        "--cold-only", action="store_true",
        help="only the cold series (Fast) and `runc run -d` beside it: the quick A/B of a "
        "change to the cold create path",
    )  # fmt: skip
    args = parser.parse_args()
    results = Results()
    if args.cold_only:
        with bench_server() as bench:
            run_cold(bench, results, args.n)
        return 0
    with bench_server() as bench, contextlib.ExitStack() as stack:
        docker = None
        if Docker.missing() is None:
            from benchmarks.peers import docker_peer

            docker = stack.enter_context(docker_peer(bench.work / "docker", bench.layout))
        run(bench, results, args.n, docker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
