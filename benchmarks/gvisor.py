"""gVisor create: create → the user's process running under runsc (pool `--runtime gvisor`),
cold; warm once pools accept warm slots.

Run as root:  .venv/bin/python benchmarks/gvisor.py [-n 10]

Same series and boundaries as benchmarks/create_latency.py (Fast mode), on a gVisor pool. The
marker is seen through the container's rootfs on the host (runsc's gofer writes it there).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.create_latency import _series
from benchmarks.harness import Bench, Results, bench_server


def run(bench: Bench, results: Results, n: int) -> None:
    print(f"\n== gVisor create (n={n})", flush=True)
    if shutil.which("runsc") is None:
        results.note("gVisor: not measured (runsc not installed)")
        return
    try:
        bench.pool("gvisor", "--runtime", "gvisor", agents=1, per_agent=4)
        series = asyncio.run(_series(bench, "gvisor", n, ("fast",)))
    except Exception as exc:  # reported, so the rest of the run goes on
        results.note(f"gVisor: not measured ({type(exc).__name__}: {str(exc)[:300]})")
        return
    for key, values in series.items():
        results.add("gvisor", f"gvisor cold {key}", values, f"as create_latency: {key}")
    refused = bench.try_pool("gvisor-warm", "--runtime", "gvisor", "--warm-slots", "2")
    if refused:
        results.note(f"gVisor warm: not measured (warmSlots refused: {refused})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10)
    args = parser.parse_args()
    with bench_server() as bench:
        run(bench, Results(), args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
