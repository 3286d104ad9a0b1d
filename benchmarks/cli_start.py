"""CLI start time: `fsb exec NAME -- true` and `fsb run` wall time against `kubectl version
--client`, pair by pair in one run.

Run as root:  .venv/bin/python benchmarks/cli_start.py [-n 20]

Series (each: process spawned → exited, one at a time, the pair alternating):
  fsb exec NAME -- true      the whole command: start-up, imports, token, one exec round trip
  fsb exec --bad-flag        start-up and argument parsing only (exits 2 before any RPC)
  fsb --version              the smallest start: the entry point, typer, nothing else
  kubectl version --client   Kubernetes' Go client (~/.cache/fastsandbox/k8s-*/kubectl)
  python -c pass             the interpreter alone: the floor of any Python CLI
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import ROOT, Bench, Results, bench_server

SECTION = "cli start"
FSB = str(ROOT / ".venv/bin/fsb")


def _kubectl() -> str | None:
    found = sorted(Path.home().glob(".cache/fastsandbox/k8s-*/kubectl"))
    return str(found[-1]) if found else None


def _wall(argv: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, env=env, check=False)
    took = (time.perf_counter() - t0) * 1000
    if proc.returncode not in ok:
        raise RuntimeError(f"{argv}: exit {proc.returncode}: {proc.stderr.decode()[-300:]}")
    return took


def run(bench: Bench, results: Results, n: int) -> None:
    from fastsandbox.sdk import AsyncClient

    print(f"\n== CLI start (n={n} each)", flush=True)
    bench.pool("cli", agents=1, per_agent=2)

    async def make() -> None:
        async with AsyncClient(endpoint=bench.server.endpoint) as client:
            await client.create("cli-target", bench.image, pool="cli")

    asyncio.run(make())
    env = bench.server.env
    kubectl = _kubectl()
    series: dict[str, list[float]] = {}
    commands = {
        "fsb exec NAME -- true": ([FSB, "exec", "cli-target", "--", "true"], (0,)),
        "fsb exec --bad-flag": ([FSB, "exec", "--bad-flag", "x"], (2,)),
        "fsb --version": ([FSB, "--version"], (0,)),
        "python -c pass": ([sys.executable, "-c", "pass"], (0,)),
    }
    if kubectl:
        commands["kubectl version --client"] = ([kubectl, "version", "--client"], (0,))
    else:
        results.note("kubectl version --client: not measured (no ~/.cache/fastsandbox/k8s-*)")
    for argv, ok in commands.values():  # untimed: page cache, .pyc files
        _wall(argv, env, ok)
    for _ in range(n):
        for name, (argv, ok) in commands.items():
            series.setdefault(name, []).append(_wall(argv, env, ok))
    for name, values in series.items():
        results.add(SECTION, name, values, "process spawned -> exited")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20)
    args = parser.parse_args()
    with bench_server() as bench:
        run(bench, Results(), args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
