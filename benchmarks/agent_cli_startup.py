"""What parsing the agent's command line costs an agent start, against a baseline, in one run.

Run after `scripts/setup` (no root):  .venv/bin/python benchmarks/agent_cli_startup.py [-n 20]

An agent starts on pool scale-up, so every millisecond before it serves delays the create that
waits for it. Measured sequentially, n times each, each a fresh `python` process:

  baseline   imports what an agent needs to serve (`fastsandbox.agent.server`, the containerd
             runtime) and parses its flags with argparse: the floor, what start-up cost before
             `fsb agent` became a typer verb
  fsb agent  the same imports, plus the flags parsed by the real `fsb agent` verb
             (`python -m fastsandbox.agent`'s path: typer, with its pydantic-based coercion)

Boundary: process spawned → exited (`subprocess.run`), so interpreter start-up is in both.
Numbers are printed as p50/p95/p99/mean in milliseconds, and the difference of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

ARGV = ["--name=bench", "--pool=p", "--capacity=3", "--runtime=runc", "--grace=2.5"]

BASELINE = f"""
import argparse
p = argparse.ArgumentParser()
for flag in ("--name", "--pool", "--capacity", "--runtime", "--grace"):
    p.add_argument(flag)
p.parse_args({ARGV!r})
import fastsandbox.agent.server, fastsandbox.agent.runtime.containerd
"""

FSB_AGENT = f"""
from fastsandbox.cli.commands.agent import parse
parse({ARGV!r})
import fastsandbox.agent.server, fastsandbox.agent.runtime.containerd
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(code: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20)
    n = parser.parse_args().n
    measure(FSB_AGENT, 2)  # warm the page cache and .pyc files for both
    rows = {"baseline": measure(BASELINE, n), "fsb agent": measure(FSB_AGENT, n)}
    print(f"agent start-up, process spawned → exited, n={n} each (ms)")
    print(f"{'':12}{'p50':>8}{'p95':>8}{'p99':>8}{'mean':>8}")
    for name, values in rows.items():
        cells = [pct(values, 0.5), pct(values, 0.95), pct(values, 0.99), statistics.mean(values)]
        print(f"{name:12}" + "".join(f"{v:8.1f}" for v in cells))
    extra = pct(rows["fsb agent"], 0.5) - pct(rows["baseline"], 0.5)
    print(f"cost of parsing with the fsb agent verb (p50 difference): {extra:.1f} ms")


if __name__ == "__main__":
    main()
