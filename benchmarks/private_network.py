"""What a private network costs a create: the same creates in a shared pool (the baseline,
sandboxes join their agent's namespace) and a private one (a namespace per sandbox, taken from
the agent's ready pool), without and with one published port, in the same run.

Run as root:  .venv/bin/python benchmarks/private_network.py [-n 30]

One server, pools `shared` and `private` (one agent each), busybox cached by an untimed warm-up
create per pool; one sandbox at a time, the four series taking turns create by create, each
sandbox deleted outside the timed span. Boundary of every series: SDK `AsyncClient.create()`
called → reply received (the agent has started the container). Also printed: the agent's own
work per private create (`fsbs-*` namespaces ready when the run ends, i.e. refills kept up).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import MARKER_CMD, Bench, Results, bench_server

SECTION = "private network"
BOUNDARY = "SDK create() called -> reply"


async def _run(bench: Bench, n: int, results: Results) -> None:
    from fastsandbox.sdk import AsyncClient

    series = {
        ("shared", False): "shared, no port (baseline)",
        ("shared", True): "shared, 1 port (baseline)",
        ("private", False): "private, no port",
        ("private", True): "private, 1 port",
    }
    samples: dict[str, list[float]] = {name: [] for name in series.values()}
    async with AsyncClient(endpoint=bench.server.endpoint, namespace="default") as client:
        for pool in ("shared", "private"):  # untimed: image pulled, agent warm
            await client.create(f"warm-{pool}", bench.image, pool=pool, command=MARKER_CMD)
            await client.delete(f"warm-{pool}", wait=True)
        for i in range(n):
            for (pool, port), name in series.items():
                sandbox = f"b-{pool[0]}{int(port)}-{i}"
                began = time.perf_counter()
                await client.create(
                    sandbox,
                    bench.image,
                    pool=pool,
                    command=MARKER_CMD,
                    ports=[8080] if port else [],
                )
                samples[name].append((time.perf_counter() - began) * 1000)
                await client.delete(sandbox, wait=True)
    for name, values in samples.items():
        results.add(SECTION, name, values, BOUNDARY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=30, help="creates per series")
    args = parser.parse_args()
    results = Results()
    with bench_server("--no-default-pool") as bench:
        bench.pool("shared", "--network-mode", "shared")
        bench.pool("private")
        print(f"{SECTION}: {args.n} creates per series, one at a time", flush=True)
        asyncio.run(_run(bench, args.n, results))


if __name__ == "__main__":
    main()
