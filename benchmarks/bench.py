"""`make bench`: every benchmark of issue 11 in one run, on one machine, with its baselines.

Run as root:  .venv/bin/python benchmarks/bench.py [-n 30] [--kubernetes] [--json PATH]
                                                   [--only create,exec,tti,burst,scale,gvisor,cli]

One `fsb server` (benchmarks/harness.py) and one private dockerd (benchmarks/peers.py) serve
every piece; each piece is its own module (create_latency, exec_latency, time_to_interactive,
burst, scale, gvisor, cli_start) with its boundaries in its docstring. Prints p50/p95/p99/max with
the boundary of each number, then the issue's targets as met / MISSED against this run's own
baselines, and writes everything to a JSON file (default bench-results.json). `--kubernetes` adds
the Kubernetes shape (benchmarks/create_latency_kubernetes.py, after the embedded server is
stopped). The machine is shared: compare series only within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (
    burst,
    cli_start,
    create_latency,
    exec_latency,
    gvisor,
    scale,
    time_to_interactive,
)
from benchmarks.harness import ROOT, Results, bench_server
from benchmarks.peers import Docker, docker_peer

PIECES = ("create", "exec", "tti", "burst", "scale", "gvisor", "cli")


def _check(results: Results, what: str, value: float | None, limit: float | None) -> None:
    if value is None or limit is None:
        print(f"  {what:<58} not measured")
        return
    verdict = "met" if value <= limit else "MISSED"
    print(f"  {what:<58} {value:9.2f} vs {limit:9.2f}  {verdict}")
    results.series.append({"section": "targets", "name": what, "value": value,
                           "limit": limit, "met": value <= limit})  # fmt: skip


KUBE = "Kubernetes shape"


def targets(r: Results) -> None:
    print("\n== targets (issue 11), this run's numbers")
    p = r.p50
    runc, ctr = p("create", "runc run -d"), p("create", "ctr run -d")
    cold, strong = p("create", "cold fast running"), p("create", "cold strong running")
    _check(r, "cold create p50 (running) <= 1.3 x runc run -d", cold,
           1.3 * runc if runc else None)  # fmt: skip
    _check(r, "Strong over Fast p50 (cold, running) <= +5 ms", strong,
           cold + 5 if cold is not None else None)  # fmt: skip
    warm = p("create", "warm fast running")
    _check(r, "Strong over Fast p50 (warm, running) <= +5 ms", p("create", "warm strong running"),
           warm + 5 if warm is not None else None)  # fmt: skip
    _check(r, "warm create p50 <= 10 ms", warm, 10.0)
    _check(r, "warm create p99 <= 30 ms", r.quantile("create", "warm fast running", "p99"), 30.0)
    docker = p("create", "docker run -d")
    if warm is not None:
        _check(r, "warm create p50 <= 0.25 x ctr run -d", warm, 0.25 * ctr if ctr else None)
        _check(r, "warm create p50 <= 0.5 x runc run -d", warm, 0.5 * runc if runc else None)
        _check(r, "warm create p50 <= 0.1 x docker run -d", warm, 0.1 * docker if docker else None)
    _check(r, "100 concurrent creates all running <= 500 ms (warm)",
           p("burst", "100 concurrent warm: all running"), 500.0)  # fmt: skip
    _check(r, "100 concurrent cold creates all running <= 100 concurrent ctr run -d",
           p("burst", "100 concurrent: all running"),
           p("burst", "100 concurrent ctr run -d"))  # fmt: skip
    sdk = p("exec", 'sdk run("true")')
    _check(r, "exec round trip p50 <= 5 ms", sdk, 5.0)
    rexec, dexec = p("exec", "runc exec true"), p("exec", "docker exec true")
    _check(r, "exec p50 <= 0.4 x runc exec", sdk, 0.4 * rexec if rexec else None)
    _check(r, "exec p50 <= 0.1 x docker exec", sdk, 0.1 * dexec if dexec else None)
    _check(r, "time to interactive p50 <= 15 ms (warm)",
           p("time to interactive", "warm: create + run('uname -a')"), 15.0)  # fmt: skip
    a1k = p("scale", "allocate at 1000 agents (us)")
    a10k = p("scale", "allocate at 10000 agents (us)")
    _check(r, "allocate at 10k agents p50 <= 20 us", a10k, 20.0)
    _check(r, "allocate 10k within 2 x 1k", a10k, 2 * a1k if a1k else None)
    rss = next((s["value"] for s in r.series if s["name"].startswith("control-plane RSS")), None)
    _check(r, "control-plane RSS at 10k sandboxes <= 250 MB", rss, 250.0)
    _check(r, "gVisor cold create p50 <= 200 ms", p("gvisor", "gvisor cold fast running"), 200.0)
    _check(r, "gVisor warm create p50 <= 20 ms", p("gvisor", "gvisor warm fast running"), 20.0)
    _check(r, "fsb exec start <= 100 ms (whole command)", p("cli start", "fsb exec NAME -- true"),
           100.0)  # fmt: skip
    cli_run, sdk_create = (
        p("cli start", "fsb run NAME --image IMG"),
        p("cli start", "sdk create (same spec)"),
    )
    _check(r, "fsb run start <= 100 ms (fsb run p50 - sdk create p50)",
           cli_run - sdk_create if cli_run is not None and sdk_create is not None else None,
           100.0)  # fmt: skip
    _check(r, "Kubernetes warm create p50 <= 15 ms (follower)",
           p(KUBE, "kube warm fast (follower)"), 15.0)  # fmt: skip


def kubernetes(results: Results, n: int) -> None:
    """benchmarks/create_latency_kubernetes.py in a child (its own cluster, after the embedded
    server is gone); its series join this run's results."""
    from benchmarks.create_latency_kubernetes import BOUNDARIES

    print(f"\n== {KUBE} (benchmarks/create_latency_kubernetes.py)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kube.json"
        kube = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks/create_latency_kubernetes.py"),
             "-n", str(n), "--no-embedded", "--json", str(out)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if kube.returncode != 0 or not out.exists():
            why = kube.stderr[-2000:]
            results.note(f"kubernetes shape: failed (exit {kube.returncode}): {why}")
            return
        got = json.loads(out.read_text())
    for line in kube.stdout.splitlines():
        if "start-up:" in line:
            print(line)
    for name, values in got["series"].items():
        results.add(KUBE, name, values, BOUNDARIES[name])
    results.note(f"kubernetes warm: {got['misses']} creates found no ready slot (not samples)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="samples per latency series")
    parser.add_argument("--kubernetes", action="store_true", help="add the Kubernetes shape")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results.json")
    parser.add_argument("--only", default=",".join(PIECES), help="comma-separated pieces")
    args = parser.parse_args()
    only = set(args.only.split(","))
    results = Results()
    began = time.time()
    print(f"Fast Sandbox benchmarks, {os.cpu_count()} CPUs, {platform.platform()}; "
          "a shared machine: numbers are noisy, compare within this run")  # fmt: skip
    if "scale" in only:
        scale.run(results)
    with bench_server() as bench, contextlib.ExitStack() as stack:
        docker = None
        if Docker.missing() is None and only & {"create", "exec"}:
            docker = stack.enter_context(docker_peer(bench.work / "docker", bench.layout))
        elif Docker.missing():
            results.note(f"docker: {Docker.missing()}")
        if "create" in only:
            create_latency.run(bench, results, args.n, docker)
        if "exec" in only:
            exec_latency.run(bench, results, max(args.n, 30), docker)
        if docker is not None:
            stack.close()  # dockerd off before the burst: it would share the 2 cores
        if "tti" in only:
            time_to_interactive.run(bench, results, args.n)
        if "burst" in only:
            burst.run(bench, results)
        if "gvisor" in only:
            gvisor.run(bench, results, max(args.n // 3, 5))
        if "cli" in only:
            cli_start.run(bench, results, max(args.n // 2, 10))
    if args.kubernetes:
        kubernetes(results, args.n)
    else:
        results.note("kubernetes shape: not measured (pass --kubernetes)")
    targets(results)
    results.write(args.json, {"started": began, "cpus": os.cpu_count(), "n": args.n})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
