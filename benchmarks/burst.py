"""Burst: 100 concurrent SDK creates over a pool of 5 agents (20 slots each, image cached) →
time until all 100 user processes run.

Run as root:  .venv/bin/python benchmarks/burst.py [--count 100 --agents 5] [--rounds 2]
                                                  [--event-loop uvloop]

Series (each round: all creates sent at once from one client, then all deleted untimed):
  all replied           first create sent → the last reply received
  all running           first create sent → the last of the markers the user processes write is
                        seen on the host (benchmarks/harness.py)
  per-create reply      each create's own call → reply
  server runtimeReadyMs each reply's timings: arrival at the server → agent confirmed the start

The same burst runs cold (pool `burst`, no warm slots) and warm (pool `burst-warm`: as many
warm slots per agent as it has sandbox slots, the image prewarmed, `--network-mode shared`;
each round waits, untimed, until the pool shows `count` ready slots). A warm round's running
markers are looked for in the rootfs of every slot ready before it (a claimed slot keeps its
`w-` id) and, for creates that found none (counted as misses), in their own container's.
Then the baselines: `count` concurrent `runc run -d` and `ctr run -d` in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import MARKER_CMD, Bench, Results, bench_server

WARM_POOL_WAIT_SECONDS = 180.0
STALE_STATUS_SECONDS = 3.0  # three heartbeats

SECTION = "burst"


def _watch(
    paths: dict[str, Path],
    seen: dict[str, float],
    stop: threading.Event,
    want: int,
    bound: float = 60.0,
) -> None:
    """Fill `seen` with when each path first exists, until `want` of them do (or `bound` s)."""
    deadline = time.perf_counter() + bound
    while not stop.is_set() and len(seen) < want and time.perf_counter() < deadline:
        for name, path in paths.items():
            if name not in seen and path.exists():
                seen[name] = time.perf_counter()
        time.sleep(0.0005)


async def _warm_ready(client: object, pool: str, count: int) -> None:
    """Until the pool shows `count` ready warm slots (untimed). The status lags the agents by a
    heartbeat: right after a round (or the warm-up) claimed slots it may still show the count
    from before the claims, so first wait (a few heartbeats at most) until it shows fewer."""
    caught_up = time.monotonic() + STALE_STATUS_SECONDS
    while time.monotonic() < caught_up:
        got = await client.get_pool(pool)  # type: ignore[attr-defined]
        if sum(w.ready for w in got.status.warm_slots) < count:
            break
        await asyncio.sleep(0.1)
    deadline = time.monotonic() + WARM_POOL_WAIT_SECONDS
    ready = 0
    while time.monotonic() < deadline:
        got = await client.get_pool(pool)  # type: ignore[attr-defined]
        ready = sum(w.ready for w in got.status.warm_slots)
        if ready >= count:
            await asyncio.sleep(1.0)  # let the last slots' heartbeat reach every replica
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"pool {pool}: {ready} of {count} warm slots ready after the wait")


async def _round(
    bench: Bench, pool: str, count: int, tag: str, warm: bool = False
) -> dict[str, list[float]]:
    from fastsandbox.sdk import AsyncClient

    out: dict[str, list[float]] = {"per-create reply": [], "server runtimeReadyMs": []}
    async with AsyncClient(endpoint=bench.server.endpoint, namespace="default") as client:
        names = [f"burst-{tag}-{i:03d}" for i in range(count)]
        ids: dict[str, str] = {}
        warm_ids: set[str] = set()
        slot_paths: list[Path] = []
        if warm:
            await _warm_ready(client, pool, count)
            slot_paths = bench.slot_markers()

        async def one(name: str) -> None:
            began = time.perf_counter()
            made = await client.create(name, bench.image, pool=pool, command=MARKER_CMD)
            out["per-create reply"].append((time.perf_counter() - began) * 1000)
            if made.timings and made.timings.runtime_ready_ms is not None:
                out["server runtimeReadyMs"].append(made.timings.runtime_ready_ms)
            if made.timings and made.timings.warm:
                warm_ids.add(name)
            ids[name] = made.container_id

        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in names))
        replied = time.perf_counter()
        paths = {n: p for n in names if (p := bench.marker(ids[n])) is not None}
        # A claimed slot's rootfs is named by the slot: any of the slots ready before counts.
        paths.update({str(p): p for p in slot_paths})
        seen: dict[str, float] = {}
        stop = threading.Event()
        await asyncio.to_thread(_watch, paths, seen, stop, count)
        out["all replied"] = [(replied - started) * 1000]
        if len(seen) >= count:
            out["all running"] = [(sorted(seen.values())[count - 1] - started) * 1000]
        if warm:
            out["warm hits"] = [float(len(warm_ids))]
        await asyncio.gather(*(client.delete(n, wait=True) for n in names))
    return out


def _concurrent(argvs: list[list[str]]) -> float:
    """Milliseconds from spawning all of `argvs` at once to the last one's exit."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.peers import timed

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(argvs)) as pool:
        list(pool.map(timed, argvs))
    return (time.perf_counter() - started) * 1000


def baselines(bench: Bench, results: Results, count: int) -> None:
    """The same burst without us: `count` concurrent `runc run -d` (no containerd) and
    `ctr run -d` (same containerd), each then removed untimed."""
    from benchmarks.peers import RuncBundle

    runc = RuncBundle.unpack(bench.layout, bench.work)
    ids = [f"burst-runc-{os.getpid()}-{i}" for i in range(count)]
    took = _concurrent([runc.runc("run", "-d", "--bundle", str(runc.bundle), c) for c in ids])
    for cid in ids:
        runc.kill(cid)
    results.add(SECTION, f"{count} concurrent runc run -d", [took],
                "all spawned at once -> the last exited (no containerd)")  # fmt: skip
    ctr = ["ctr", "-a", str(bench.server.containerd_socket), "-n", "fastsandbox"]
    ids = [f"burst-ctr-{os.getpid()}-{i}" for i in range(count)]
    took = _concurrent([[*ctr, "run", "-d", bench.image, c, "sleep", "3600"] for c in ids])
    for cid in ids:
        subprocess.run([*ctr, "tasks", "kill", "-s", "KILL", cid], capture_output=True)
    time.sleep(1.0)
    for cid in ids:
        subprocess.run([*ctr, "tasks", "delete", cid], capture_output=True)
        subprocess.run([*ctr, "containers", "delete", cid], capture_output=True)
    results.add(SECTION, f"{count} concurrent ctr run -d", [took],
                "all spawned at once -> the last exited (same containerd)")  # fmt: skip


BOUNDARIES = {
    "all replied": "first create sent -> last reply (one sample per round)",
    "all running": "first create sent -> last user-process marker seen (one per round)",
    "per-create reply": "each create's call -> its reply",
    "server runtimeReadyMs": "server: arrival -> agent confirmed the start",
}


def run(
    bench: Bench,
    results: Results,
    count: int = 100,
    agents: int = 5,
    rounds: int = 2,
    kinds: tuple[str, ...] = ("cold", "warm"),
) -> None:
    print(f"\n== burst: {count} concurrent creates over {agents} agents", flush=True)
    per_agent = -(-count // agents)
    for kind in kinds:
        warm = kind == "warm"
        pool = "burst-warm" if warm else "burst"
        extra = ("--warm-slots", str(per_agent), "--prewarm-image", bench.image)
        extra += ("--network-mode", "shared") if warm else ()
        bench.pool(pool, *(extra if warm else ()), agents=agents, per_agent=per_agent)
        merged: dict[str, list[float]] = {}
        # An untimed round first: every agent has the image and its connections open.
        asyncio.run(_round(bench, pool, agents, f"{kind}-warmup"))
        for r in range(rounds):
            got = asyncio.run(_round(bench, pool, count, f"{kind}-{r}", warm=warm))
            for key, values in got.items():
                merged.setdefault(key, []).extend(values)
        hits = merged.pop("warm hits", None)
        if hits is not None:
            results.note(
                f"burst warm: {int(sum(hits))} of {count * rounds} creates claimed a warm slot"
            )
        label = f"{count} concurrent" + (" warm" if warm else "")
        for key, values in merged.items():
            results.add(SECTION, f"{label}: {key}", values, BOUNDARIES[key])
        # The warm pool's slots hold the agents' capacity: it goes before the next measurement.
        if warm:
            bench.server.fsb("pool", "delete", pool)
    baselines(bench, results, count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--kinds", default="cold,warm", help="which bursts: cold, warm or both (cold,warm)"
    )
    parser.add_argument(
        "--event-loop", choices=("asyncio", "uvloop"), default="asyncio",
        help="the server's and agents' loop (FSB_EVENT_LOOP; uvloop must be installed)",
    )  # fmt: skip
    args = parser.parse_args()
    os.environ["FSB_EVENT_LOOP"] = args.event_loop
    print(f"event loop: {args.event_loop}")
    with bench_server() as bench:
        kinds = tuple(k for k in args.kinds.split(",") if k)
        run(bench, Results(), args.count, args.agents, args.rounds, kinds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
