"""Write latency of the SQLite object store: `create` and `update_status`, one at a time.

Run:  .venv/bin/python benchmarks/store_latency.py [-n 1000] [--dir DIR]

Boundary: the awaited store call, from the caller's view (model → JSON, the transaction through
aiosqlite's thread, commit in WAL with synchronous=NORMAL, publish to watchers). The file lives
in a temp dir on DIR (default: the system temp dir; put it on the data dir's disk to measure
that disk). Prints p50/p95/p99/mean in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from fastsandbox.api.models import Sandbox, SandboxPhase
from fastsandbox.store.sqlite import SqliteStore


def _summary(label: str, samples: list[float]) -> str:
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return (
        f"{label:<14} n={len(ordered)}  p50={pct(0.50):.3f}  p95={pct(0.95):.3f}  "
        f"p99={pct(0.99):.3f}  mean={statistics.fmean(ordered):.3f}  (ms)"
    )


async def _run(n: int, base: Path | None) -> None:
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        store = await SqliteStore.open(Path(tmp) / "state.db")
        try:
            created: list[Sandbox] = []
            create_ms: list[float] = []
            for i in range(n):
                sb = Sandbox.model_validate(
                    {
                        "metadata": {"name": f"bench-{i}", "labels": {"bench": "yes"}},
                        "spec": {"image": "busybox", "poolRef": "default-pool", "args": ["x"]},
                    }
                )
                start = time.perf_counter()
                created.append(await store.create(sb))
                create_ms.append((time.perf_counter() - start) * 1000)
            status_ms: list[float] = []
            for sb in created:
                sb.status.phase = SandboxPhase.RUNNING
                sb.status.container_id = sb.metadata.uid
                start = time.perf_counter()
                await store.update_status(sb)
                status_ms.append((time.perf_counter() - start) * 1000)
        finally:
            await store.close()
    print(_summary("create", create_ms))
    print(_summary("update_status", status_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    asyncio.run(_run(args.n, args.dir))


if __name__ == "__main__":
    main()
