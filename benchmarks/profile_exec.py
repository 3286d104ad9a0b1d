"""Where an exec's time goes: py-spy profiles of the server and the agent while one idle sandbox
runs `commands.run("true")` back to back (benchmarks/exec_latency.py's series).

Run as root:  .venv/bin/python benchmarks/profile_exec.py [-n 300] [--out DIR]

Prints the exec p50 of the profiled run (py-spy's sampling slows it a little) and the top
self-time frames of each process, with --idle off; raw collapsed stacks are left in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import ROOT, bench_server
from benchmarks.peers import pct
from benchmarks.profile_burst import _cpu, _top


async def _execs(endpoint: str, token: str, image: str, n: int, spy: list[str]) -> list[float]:
    from fastsandbox import AsyncSandbox

    out: list[float] = []
    async with await AsyncSandbox.create(
        image=image, pool="prof", endpoint=endpoint, token=token
    ) as sb:
        for _ in range(20):
            await sb.commands.run("true")
        # py-spy attaches here, after the warm-up: a Popen that returns at once.
        procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
                 for a in spy]  # fmt: skip
        await asyncio.sleep(0.5)
        for _ in range(n):
            t0 = time.perf_counter()
            await sb.commands.run("true")
            out.append((time.perf_counter() - t0) * 1000)
        for p in procs:
            p.send_signal(2)
            p.wait(timeout=30)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fsb-profile-exec"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pyspy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")
    with bench_server() as bench:
        bench.pool("prof", agents=1, per_agent=2)
        server = bench.server.proc.pid if bench.server.proc else 0
        agent = next(p for p, (c, _) in _cpu().items() if "agent" in c and "python" in c)
        spy = [
            [pyspy, "record", "-p", str(pid), "-r", "500", "-f", "raw", "-o",
             str(args.out / f"{name}.txt"), "--nonblocking"]
            for name, pid in (("server", server), ("agent", agent))
        ]  # fmt: skip
        took = asyncio.run(_execs(bench.server.endpoint, bench.token, bench.image, args.n, spy))
    print(f"exec under py-spy: p50 {pct(took, 50):.2f} ms, p95 {pct(took, 95):.2f} ms")
    for name in ("server", "agent"):
        raw = args.out / f"{name}.txt"
        if raw.exists():
            print(f"py-spy {name}: top self-time frames (% of samples)")
            for share, frame in _top(raw, 20):
                print(f"  {share:3d}%  {frame[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
