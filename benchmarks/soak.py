"""Soak: create / exec / file write / delete at a steady rate for a while, then the resources
every part holds at the start against the end (issue 12). Not in CI.

Run as root after `scripts/setup`:

    .venv/bin/python benchmarks/soak.py --minutes 30 [--rate 1.0] [--keep 4]

It starts on loopback a docker-registry with the busybox demo image and an `fsb server` with its
own containerd in a temp data dir, a pool `soak` of two agents, and keeps `--keep` long-lived
sandboxes running. Each cycle (`--rate` per second, paced from the start so a slow cycle does not
shift the others): create a sandbox, exec `echo` in it, write a 64 KiB file into it and read it
back, exec in a long-lived one, delete the new one (waiting until it is gone).

Before the first cycle (after a warm-up of 10 cycles) and after the last, it reads: open fds and
RSS of the server, each agent, each shim and containerd; zombie processes; mounts under the data
dir; containerd's containers, tasks and snapshots; the network namespaces of the server's agents.
The table prints both and the difference; cycle latency is printed as p50/p95/p99/max.
Everything is removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peers import row  # noqa: E402
from fastsandbox.sdk import AsyncClient  # noqa: E402
from fastsandbox.sdk.commands import AsyncCommands  # noqa: E402
from fastsandbox.sdk.files import AsyncFiles  # noqa: E402
from tests.e2e._server import Server, free_port, new_server, purge  # noqa: E402
from tests.fault._leaks import active_snapshots  # noqa: E402

POOL = "soak"
PAYLOAD = os.urandom(64 * 1024)


def _processes(server: Server) -> dict[str, list[int]]:
    """pids by role: server, agent, shim, containerd (this server's only)."""
    data = str(server.data_dir)
    roles: dict[str, list[int]] = {"server": [], "agent": [], "shim": [], "containerd": []}
    assert server.proc is not None
    roles["server"].append(server.proc.pid)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = b" ".join(argv).decode(errors="replace")
        if data not in line or int(proc.name) == server.proc.pid:
            continue
        exe = Path(argv[0].decode(errors="replace")).name
        if "containerd-shim" in exe:
            roles["shim"].append(int(proc.name))
        elif exe == "containerd":
            roles["containerd"].append(int(proc.name))
        elif "fastsandbox.agent" in line and "--state-dir" in line:
            roles["agent"].append(int(proc.name))
    return roles


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _zombies() -> int:
    count = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    count += 1
    return count


def sample(server: Server) -> dict[str, int]:
    out: dict[str, int] = {}
    for role, pids in _processes(server).items():
        out[f"{role} processes"] = len(pids)
        out[f"{role} fds"] = sum(_fds(p) for p in pids)
        out[f"{role} rss KiB"] = sum(_rss_kib(p) for p in pids)
    out["zombies (host)"] = _zombies()
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    out["mounts under data dir"] = sum(1 for m in mounts if str(server.data_dir) in m.split()[1])
    out["containers"] = len(server.containers())
    out["running tasks"] = len(server.running_tasks())
    out["active snapshots"] = len(active_snapshots(server))
    agents = {p.name for p in (server.data_dir / "agents").iterdir() if p.is_dir()}
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out["agent netns"] = sum(
        1 for line in netns.splitlines() if line and any(a in line.split()[0] for a in agents)
    )
    return out


async def cycle(client: AsyncClient, image: str, i: int, keep: list[str]) -> None:
    name = f"soak-{i}"
    await client.create(name, image, pool=POOL, command=["sleep", "3600"])
    got = await AsyncCommands(client, "default", name).run(["echo", name], timeout=30)
    assert got.stdout == f"{name}\n", got
    files = AsyncFiles(client, "default", name)
    await files.write("/tmp/payload", PAYLOAD)
    assert await files.read("/tmp/payload") == PAYLOAD
    if keep:
        target = keep[i % len(keep)]
        got = await AsyncCommands(client, "default", target).run(["true"], timeout=30)
        assert got.exit_code == 0
    await client.delete(name, wait=True)


async def soak(server: Server, image: str, seconds: float, rate: float, keep_n: int) -> int:
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    async with AsyncClient(
        server.endpoint, server.token, "default", ca_file=server.ca_file, timeout=120
    ) as client:
        keep = [f"keep-{k}" for k in range(keep_n)]
        for name in keep:
            await client.create(name, image, pool=POOL, command=["sleep", "infinity"])
        for i in range(10):  # warm-up: pulls, connections, caches
            await cycle(client, image, 100000 + i, keep)
        start = sample(server)
        began = time.monotonic()
        i = 0
        while time.monotonic() - began < seconds:
            due = began + i / rate
            await asyncio.sleep(max(due - time.monotonic(), 0))
            t = time.perf_counter()
            try:
                await asyncio.wait_for(cycle(client, image, i, keep), 120)
            except Exception as exc:  # counted and shown; a soak goes on
                errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                with contextlib.suppress(Exception):
                    await client.delete(f"soak-{i}", wait=True)
            latencies.append((time.perf_counter() - t) * 1000)
            i += 1
        await asyncio.sleep(3)  # the last delete's cleanup, the pool's status pass
        end = sample(server)
        for name in keep:
            await client.delete(name, wait=True)
    took = time.monotonic() - began
    print(
        f"\nsoak: {i} cycles in {took / 60:.1f} min ({i / took:.2f}/s; target {rate}/s), "
        f"{keep_n} long-lived sandboxes, {os.cpu_count()} CPUs"
    )
    print(row("cycle (create+exec+write+read+delete)", latencies))
    print(f"errors: {sum(errors.values())} {dict(errors) if errors else ''}")
    print(f"\n{'resource':<28}{'start':>12}{'end':>12}{'delta':>10}")
    for key in start:
        a, b = start[key], end.get(key, 0)
        print(f"{key:<28}{a:>12}{b:>12}{b - a:>+10}")
    return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=1.0, help="cycles per second")
    parser.add_argument("--keep", type=int, default=4, help="long-lived sandboxes")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (it starts containerd and containers)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = Path(tempfile.mkdtemp(prefix="fsb-soak-", dir="/tmp"))
    registry_addr = f"127.0.0.1:{free_port()}"
    server = new_server(registry_addr)
    try:
        subprocess.run(
            [str(ROOT / "scripts/demo-registry"), str(work), registry_addr],
            check=True,
            capture_output=True,
        )
        image = f"{registry_addr}/busybox:latest"
        server.start()
        made = server.fsb("pool", "create", POOL, "--min", "2", "--max", "2", "--per-agent", "8")
        assert made.returncode == 0, made.stderr
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            got = server.fsb("pool", "get", POOL, "-o", "json")
            if got.returncode == 0 and json.loads(got.stdout)["status"]["agents"]["ready"] == 2:
                break
            time.sleep(0.2)
        os.environ["FSB_DATA_DIR"] = str(server.data_dir)
        return asyncio.run(soak(server, image, args.minutes * 60, args.rate, args.keep))
    finally:
        purge(server)
        with contextlib.suppress(Exception):
            out = subprocess.run(
                ["pgrep", "-f", f"{work}/registry/config.yml"], capture_output=True, text=True
            ).stdout.split()
            for pid in out:
                os.kill(int(pid), signal.SIGTERM)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
