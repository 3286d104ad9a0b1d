"""gVisor create: create → the user's process running under runsc (pool `--runtime gvisor`),
cold, and warm (pool `gvisor-warm`, `--warm-slots 1`, the image prewarmed), against `runsc`
itself in the same run.

Run as root:  .venv/bin/python benchmarks/gvisor.py [-n 10]

Same series and boundaries as benchmarks/create_latency.py (Fast mode), on gVisor pools. The
marker is seen through the container's rootfs on the host (runsc's gofer writes it there).
Both the cold and the warm pool are private (the default: a network namespace per sandbox); a
warm pool with `networkMode: shared` is measured too, for what the network part of a claim
costs. Baselines (benchmarks/peers.py): `runsc run --detach` and `runsc create` + `runsc start`
(two processes, as the runc shim drives runsc) on an unpacked busybox bundle, with the flags our
runsc wrapper adds, no containerd.
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
from benchmarks.peers import RuncBundle


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
    # slots are made with the pool's default limits; misses are counted, not samples.
    for pool, label, extra in (
        ("gvisor-warm", "warm", ()),
        ("gvisor-warm-shared", "warm shared network", ("--network-mode", "shared")),
    ):
        _warm(bench, results, n, pool, label, extra)
    runsc = RuncBundle.unpack(bench.layout, bench.work)
    results.add("gvisor", "runsc run --detach", runsc.bench_runsc(n),
                "runsc process spawned -> exited (unpacked bundle, no containerd)")  # fmt: skip
    results.add("gvisor", "runsc create + start", runsc.bench_runsc(n, split=True),
                "two runsc processes, spawned -> exited, summed")  # fmt: skip


def _warm(
    bench: Bench, results: Results, n: int, pool: str, label: str, extra: tuple[str, ...]
) -> None:
    try:
        bench.pool(
            pool, "--runtime", "gvisor", "--warm-slots", "1", "--prewarm-image", bench.image,
            *extra, agents=1, per_agent=4,
        )  # fmt: skip
        warm = asyncio.run(_series(bench, pool, n, ("fast",), warm=True))
    except Exception as exc:  # reported, so the rest of the run goes on
        results.note(f"gVisor {label}: not measured ({type(exc).__name__}: {str(exc)[:300]})")
        return
    misses = warm.pop("misses", [0.0])
    hits = len(next(iter(warm.values()), []))
    results.note(f"gVisor {label}: {hits} creates claimed a slot; {int(misses[0])} found none")
    for key, values in warm.items():
        results.add("gvisor", f"gvisor {label} {key}", values, f"as create_latency: {key}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10)
    args = parser.parse_args()
    with bench_server() as bench:
        run(bench, Results(), args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
