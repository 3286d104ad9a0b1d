"""Time to interactive: `AsyncSandbox.create()` → the result of a first `commands.run("uname -a")`,
as public sandbox benchmarks measure it, checking that no marker an earlier sandbox left in /tmp
is seen (a reused, not reset, container would show it).

Run as root:  .venv/bin/python benchmarks/time_to_interactive.py [-n 30]

Boundary: `AsyncSandbox.create()` called (a new sandbox object and client each time, as a user's
script makes them) → `commands.run("uname -a")` returned its result. Untimed after it: `test ! -e
/tmp/fsb-tti` must succeed, then the marker is written and the sandbox deleted. The SDK's clients
of one event loop share their connection to the server (`sdk/_channels.py`, the connection pool
of an HTTP SDK), so these samples reuse it; the `new connection` series makes each sample
connect anew (TCP, TLS, HTTP/2), as the first sandbox of a new process does.

Warm: pool `tti-warm` (--warm-slots 2, the image prewarmed); before each create the benchmark
waits, untimed, for a ready slot (the refill after the last claim, as create_latency.py does),
and only creates that claimed one are samples (misses are counted in a note).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Bench, Results, bench_server, wait_slot

SECTION = "time to interactive"
CHECK = "test ! -e /tmp/fsb-tti && touch /tmp/fsb-tti"


async def _series(
    bench: Bench, pool: str, n: int, warm: bool = False, fresh: bool = False
) -> tuple[list[float], int]:
    from fastsandbox.sdk import AsyncClient, _channels

    out: list[float] = []
    misses = 0
    async with AsyncClient(endpoint=bench.server.endpoint, namespace="default") as watcher:
        for i in range(3 * n + 1 if warm else n + 1):
            if len(out) >= n:
                break
            if warm:
                await wait_slot(watcher, pool)
                await asyncio.sleep(0.3)  # the pool's status lags the agent by a heartbeat
            if fresh:
                _channels.forget()  # this sample's client connects anew
            took, claimed = await _one(bench, pool)
            if i == 0:
                continue  # the first one warms the client's caches and the agent's image
            if warm and not claimed:
                misses += 1
                continue
            out.append(took)
    return out, misses


async def _one(bench: Bench, pool: str) -> tuple[float, bool]:
    from fastsandbox import AsyncSandbox

    started = time.perf_counter()
    sb = await AsyncSandbox.create(bench.image, pool=pool, token=bench.token)
    try:
        result = await sb.commands.run("uname -a")
        took = (time.perf_counter() - started) * 1000
        if result.exit_code != 0 or "Linux" not in result.stdout:
            raise RuntimeError(f"uname -a: {result.exit_code} {result.stderr!r}")
        check = await sb.commands.run(CHECK)
        if check.exit_code != 0:
            raise RuntimeError("a marker an earlier sandbox wrote to /tmp is visible")
    finally:
        await sb.kill()
    return took, bool(sb.timings and sb.timings.warm)


def run(bench: Bench, results: Results, n: int) -> None:
    print(f"\n== time to interactive (n={n})", flush=True)
    bench.pool("tti", agents=1, per_agent=10)
    boundary = "AsyncSandbox.create() called -> first commands.run result; no earlier /tmp marker"
    cold, _ = asyncio.run(_series(bench, "tti", n))
    results.add(SECTION, "cold: create + run('uname -a')", cold, boundary)
    # Private, as the cold pool (the default): each slot has a network namespace of its own.
    try:
        bench.pool("tti-warm", "--warm-slots", "2", "--prewarm-image", bench.image)
    except RuntimeError as refused:
        results.note(f"time to interactive warm: not measured (warmSlots refused: {refused})")
        return
    warm, misses = asyncio.run(_series(bench, "tti-warm", n, warm=True))
    results.note(
        f"time to interactive warm: {len(warm)} creates claimed a warm slot (the samples); "
        f"{misses} found none ready and were not counted"
    )
    results.add(SECTION, "warm: create + run('uname -a')", warm,
                "same, a pool with warm slots; only claims are samples")  # fmt: skip
    fresh, _ = asyncio.run(_series(bench, "tti-warm", n, warm=True, fresh=True))
    results.add(SECTION, "warm, new connection: create + run('uname -a')", fresh,
                "same, each sample's client connecting anew (TCP + TLS + HTTP/2)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30)
    args = parser.parse_args()
    with bench_server() as bench:
        run(bench, Results(), args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
