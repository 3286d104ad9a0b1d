"""Where a burst's time goes: CPU seconds per process kind during one round of
benchmarks/burst.py, and py-spy profiles (collapsed stacks) of the server and one agent.

Run as root:  .venv/bin/python benchmarks/profile_burst.py [--count 100 --agents 5] [--out DIR]

CPU per kind is read from /proc (utime+stime of every process alive at the end, minus at the
start; processes that started and ended inside the round, like `runc`, are the remainder of
the machine's total). py-spy (`pip install py-spy`) samples at 250 Hz with --idle off; the
top self-time frames are printed, the raw files are left in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.burst import _round
from benchmarks.harness import ROOT, bench_server

TICK = os.sysconf("SC_CLK_TCK")


def _cpu() -> dict[int, tuple[str, float]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (cmd, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def _total() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(f) for i, f in enumerate(fields) if i not in (3, 4))  # not idle, iowait
    return busy / TICK


def _kind(cmd: str) -> str:
    for needle, kind in (
        ("containerd-shim", "containerd-shim-runc-v2"),
        ("fastsandbox.agent", "fsb agent (python)"),
        (" agent ", "fsb agent (python)"),
        ("fsb server", "fsb server (python)"),
        ("bin/fsb server", "fsb server (python)"),
        ("containerd", "containerd"),
        ("fsb-supervisor", "fsb-supervisor"),
        ("fsb-logger", "fsb-logger"),
        ("profile_burst", "benchmark client"),
        ("py-spy", "py-spy"),
    ):
        if needle in cmd:
            return kind
    return "other"


def _top(raw: Path, k: int = 15) -> list[tuple[int, str]]:
    self_time: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            self_time[stack.split(";")[-1]] += int(count)
    total = sum(self_time.values()) or 1
    return [(c * 100 // total, f) for f, c in self_time.most_common(k)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fsb-profile"))
    parser.add_argument(
        "--warm", action="store_true", help="profile a warm burst (burst.py's warm pool)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pyspy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")
    with bench_server() as bench:
        per_agent = -(-args.count // args.agents)
        extra: tuple[str, ...] = ()
        if args.warm:
            extra = ("--warm-slots", str(per_agent), "--prewarm-image", bench.image)
            extra += ("--network-mode", "shared")
        bench.pool("burst", *extra, agents=args.agents, per_agent=per_agent)
        asyncio.run(_round(bench, "burst", args.agents, "warmup"))
        if args.warm:
            # Untimed and unprofiled: until every slot is ready again after the warm-up.
            from benchmarks.burst import _warm_ready
            from fastsandbox.sdk import AsyncClient

            async def ready() -> None:
                async with AsyncClient(endpoint=bench.server.endpoint) as client:
                    await _warm_ready(client, "burst", args.count)

            asyncio.run(ready())
        server_pid = bench.server.proc.pid if bench.server.proc else None
        agents = [p for p, (c, _) in _cpu().items() if "agent" in c and "python" in c]
        spies = []
        for name, pid in (("server", server_pid), ("agent", agents[0] if agents else None)):
            if pid is None:
                continue
            raw = args.out / f"{name}.txt"
            spies.append((name, raw, subprocess.Popen(
                [pyspy, "record", "-p", str(pid), "-r", "250", "-f", "raw", "-o", str(raw),
                 "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )))  # fmt: skip
        before, total0 = _cpu(), _total()
        result = asyncio.run(_round(bench, "burst", args.count, "profiled", warm=args.warm))
        after, total1 = _cpu(), _total()
        for _, _, proc in spies:
            proc.send_signal(2)
            proc.wait(timeout=30)
    print(f"round: all replied {result['all replied'][0]:.0f} ms; all running "
          f"{result.get('all running', [float('nan')])[0]:.0f} ms")  # fmt: skip
    by_kind: collections.Counter[str] = collections.Counter()
    for pid, (cmd, cpu) in after.items():
        by_kind[_kind(cmd)] += cpu - before.get(pid, (cmd, 0.0))[1]
    known = sum(by_kind.values())
    by_kind["short-lived (runc, mount helpers, ...)"] = max(total1 - total0 - known, 0.0)
    print(f"CPU seconds during the round (machine total {total1 - total0:.2f} s on "
          f"{os.cpu_count()} CPUs):")  # fmt: skip
    for kind, cpu in by_kind.most_common():
        print(f"  {kind:<40} {cpu:7.2f} s")
    for name, raw, _ in spies:
        if raw.exists():
            print(f"py-spy {name}: top self-time frames (% of samples)")
            for pc, frame in _top(raw):
                print(f"  {pc:3d}%  {frame[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
