"""Time to interactive: `AsyncSandbox.create()` → the result of a first `commands.run("uname -a")`,
as public sandbox benchmarks measure it, checking that no marker an earlier sandbox left in /tmp
is seen (a reused, not reset, container would show it).

Run as root:  .venv/bin/python benchmarks/time_to_interactive.py [-n 30]

Boundary: `AsyncSandbox.create()` called (a new client each time, as a user's script does) →
`commands.run("uname -a")` returned its result. Untimed after it: `test ! -e /tmp/fsb-tti` must
succeed, then the marker is written and the sandbox deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Bench, Results, bench_server

SECTION = "time to interactive"
CHECK = "test ! -e /tmp/fsb-tti && touch /tmp/fsb-tti"


async def _series(bench: Bench, pool: str, n: int) -> list[float]:
    from fastsandbox import AsyncSandbox

    out: list[float] = []
    for i in range(n + 1):
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
        if i:  # the first one warms the client's caches and the agent's image
            out.append(took)
    return out


def run(bench: Bench, results: Results, n: int) -> None:
    print(f"\n== time to interactive (n={n})", flush=True)
    bench.pool("tti", agents=1, per_agent=10)
    boundary = "AsyncSandbox.create() called -> first commands.run result; no earlier /tmp marker"
    results.add(SECTION, "cold: create + run('uname -a')", asyncio.run(_series(bench, "tti", n)),
                boundary)  # fmt: skip
    # Private, as the cold pool (the default): each slot has a network namespace of its own.
    refused = bench.try_pool("tti-warm", "--min", "1", "--max", "1", "--warm-slots", "2")
    if refused:
        results.note(f"time to interactive warm: not measured (warmSlots refused: {refused})")
    else:
        bench.pool("tti-warm", agents=1, per_agent=10)
        time.sleep(2.0)  # the agent fills its slots, off the timed span
        results.add(SECTION, "warm: create + run('uname -a')",
                    asyncio.run(_series(bench, "tti-warm", n)),
                    "same, a pool with warm slots")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30)
    args = parser.parse_args()
    with bench_server() as bench:
        run(bench, Results(), args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
