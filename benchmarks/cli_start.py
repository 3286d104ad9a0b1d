"""CLI start time: `fsb exec NAME -- true` and `fsb run` wall time against `kubectl version
--client`, pair by pair in one run.

Run as root:  .venv/bin/python benchmarks/cli_start.py [-n 20]

Series (each: process spawned → exited, one at a time, the commands taking turns):
  fsb exec NAME -- true      the whole command: start-up, token, TLS, one exec round trip, on
                             the lean client (cli/exec_lean.py: no grpc, protobuf, asyncio)
  fsb exec NAME --timeout 600 -- true
                             the same exec through typer and the SDK (an option after NAME
                             takes that path): what every exec cost before the lean client
  fsb exec --bad-flag        start-up and argument parsing only (typer: exits 2 before any RPC)
  fsb run NAME --image IMG   the whole create from the CLI (a new name each time; deleted
                             after, untimed), next to
  sdk create (same spec)     the same create from a process that is already running: the
                             difference is what `fsb run` adds (start-up, imports, validation)
  fsb --version              the smallest start: the entry point and nothing else
  kubectl version --client   Kubernetes' Go client (~/.cache/fastsandbox/k8s-*/kubectl)
  python -c pass             the interpreter alone: the floor of any Python CLI

Before timing, the package's bytecode is compiled (`compileall`), as `pip install` does for an
installed fsb: in a dev shell with PYTHONDONTWRITEBYTECODE=1 the editable tree has no .pyc, and
every start would compile each of our modules it imports from source (a cost no user pays).
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
    bench.pool("cli", agents=1, per_agent=4)

    async def make() -> None:
        async with AsyncClient(endpoint=bench.server.endpoint) as client:
            await client.create("cli-target", bench.image, pool="cli")

    async def sdk_create(name: str) -> float:
        async with AsyncClient(endpoint=bench.server.endpoint) as client:
            t0 = time.perf_counter()
            await client.create(name, bench.image, pool="cli")
            return (time.perf_counter() - t0) * 1000

    async def delete(name: str) -> None:
        async with AsyncClient(endpoint=bench.server.endpoint) as client:
            await client.delete(name, wait=True)

    asyncio.run(make())
    import compileall

    compileall.compile_dir(str(ROOT / "src" / "fastsandbox"), quiet=1)
    env = bench.server.env
    from fastsandbox.sdk._resolve import resolve

    transport = "TLS" if resolve(env=env).tls else "plaintext"
    results.note(f"cli start: fsb exec talks {transport} to {bench.server.endpoint}")
    kubectl = _kubectl()
    series: dict[str, list[float]] = {}
    commands = {
        "fsb exec NAME -- true": ([FSB, "exec", "cli-target", "--", "true"], (0,)),
        "fsb exec NAME --timeout 600 -- true (typer + SDK)": (
            [FSB, "exec", "cli-target", "--timeout", "600", "--", "true"],
            (0,),
        ),
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
    run_argv = [FSB, "run", "cli-run-warmup", "--image", bench.image, "--pool", "cli"]
    _wall(run_argv, env)
    asyncio.run(delete("cli-run-warmup"))
    for i in range(n):
        for name, (argv, ok) in commands.items():
            series.setdefault(name, []).append(_wall(argv, env, ok))
        run_argv[2] = f"cli-run-{i}"
        series.setdefault("fsb run NAME --image IMG", []).append(_wall(run_argv, env))
        asyncio.run(delete(run_argv[2]))
        series.setdefault("sdk create (same spec)", []).append(
            asyncio.run(sdk_create(f"cli-sdk-{i}"))
        )
        asyncio.run(delete(f"cli-sdk-{i}"))
    for name, values in series.items():
        boundary = "process spawned -> exited"
        if name.startswith("sdk"):
            boundary = "AsyncClient.create() called -> reply (in a running process)"
        results.add(SECTION, name, values, boundary)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20)
    args = parser.parse_args()
    with bench_server() as bench:
        run(bench, Results(), args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
