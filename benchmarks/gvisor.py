"""gVisor create: create → the user's process running under runsc (pool `--runtime gvisor`),
cold, and warm (pool `gvisor-warm`, `--warm-slots 1`, the image prewarmed).

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
    # Under gVisor a slot serves only creates asking its limits (runsc cannot change them):
    # the first creates make their limits' kind hot; misses are counted, not samples.
    try:
        bench.pool(
            "gvisor-warm", "--runtime", "gvisor", "--warm-slots", "1",
            "--prewarm-image", bench.image, "--network-mode", "shared",
            agents=1, per_agent=4,
        )  # fmt: skip
        warm = asyncio.run(_series(bench, "gvisor-warm", n, ("fast",), warm=True))
    except Exception as exc:  # reported, so the rest of the run goes on
        results.note(f"gVisor warm: not measured ({type(exc).__name__}: {str(exc)[:300]})")
        return
    misses = warm.pop("misses", [0.0])
    hits = len(next(iter(warm.values()), []))
    results.note(f"gVisor warm: {hits} creates claimed a slot; {int(misses[0])} found none")
    for key, values in warm.items():
        results.add("gvisor", f"gvisor warm {key}", values, f"as create_latency: {key}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10)
    args = parser.parse_args()
    with bench_server() as bench:
        run(bench, Results(), args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
