"""What the writable-layer size limit (agent/runtime/disk.py) adds to a create, and to a delete.

Run as root: `.venv/bin/python -m benchmarks.disk_limit_cost [-n 30]` (under
`flock /tmp/fsb-infra.lock` on a shared machine). It starts a private containerd and loopback
registry (tests/infra.py), pulls the busybox demo image once, then creates and deletes `n`
containers through `ContainerdRuntime` alternately with and without `disk_bytes` (1 GiB), so both
series see the same load. The baseline (no limit) is measured in the same run.

Boundary: `runtime.create()` → returns with the task started (image cached), and
`runtime.delete(grace 0)` → returns with task, container, snapshot (and layer) gone. Numbers are
milliseconds, p50/p95/p99/max (benchmarks/peers.py); nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.peers import row
from fastsandbox.agent.runtime.base import ContainerSpec
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from tests.infra import build_demo_image, push_image, start_containerd, start_registry


async def bench(sock: Path, image: str, work: Path, n: int) -> dict[str, list[float]]:
    registry = image.split("/", 1)[0]
    rt = ContainerdRuntime(sock, "fsb-bench-disk", [registry], state_dir=work / "runtime")
    out: dict[str, list[float]] = {
        k: [] for k in ("create", "create+disk", "delete", "delete+disk")
    }
    try:
        await rt.pull(image)
        for i in range(n):
            for disk in (None, 1 << 30):
                tag = "+disk" if disk else ""
                spec = ContainerSpec(
                    id=f"bench-disk-{i}{'-d' if disk else ''}",
                    image=image,
                    log_path=str(work / "logs" / f"{i}.log"),
                    command=("sleep", "600"),
                    cgroup_parent="/fsb-bench-disk",
                    disk_bytes=disk,
                )
                began = time.perf_counter()
                await rt.create(spec)
                out["create" + tag].append((time.perf_counter() - began) * 1e3)
                began = time.perf_counter()
                await rt.delete(spec.id, 0)
                out["delete" + tag].append((time.perf_counter() - began) * 1e3)
    finally:
        await rt.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fsb-bench-disk-"))
    ctd = start_containerd(work / "ctd")
    reg = start_registry(work / "reg")
    try:
        image = push_image(build_demo_image(work / "img"), reg.addr)
        results = asyncio.run(bench(ctd.socket, image, work, args.n))
        print(f"\nwritable-layer limit cost, {args.n} alternating samples each")
        for name, values in results.items():
            print(row(name, values))
        added = sorted(results["create+disk"])[args.n // 2] - sorted(results["create"])[args.n // 2]
        print(f"create cost of the disk limit (p50 difference): {added:.1f} ms")
    finally:
        reg.stop()
        ctd.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
