"""The one setup every embedded benchmark shares, and the one way they report.

`bench_server()` starts, on loopback only: a docker-registry with the busybox demo image, an
`fsb server` with its own containerd in a temp data dir; `Bench.pool()` makes a pool and waits for
its agents. Everything is removed at the end, also on Ctrl-C or SIGTERM.

`Results` prints every series as p50/p95/p99/max in milliseconds with its boundary (where the
timed span starts and ends) and keeps them for the JSON file `make bench` writes.

`Marker`: "the user's process runs" is a file the process itself writes (`touch /fsb-ready` in
its rootfs); the benchmark sees it appear from the host, in the container's rootfs under the
server's containerd state, polled every 0.2 ms (so a sample is at most that late).
"""

from __future__ import annotations

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import summary  # noqa: E402
from tests.e2e._server import Server, free_port, new_server, purge  # noqa: E402

MARKER = "fsb-ready"
# The user's process: writes the marker, then waits (a TERM ends it at once).
MARKER_CMD = ["sh", "-c", f"touch /{MARKER}; trap 'exit 0' TERM; sleep 3600 & wait"]


@dataclass
class Results:
    series: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self, section: str, name: str, values: list[float], boundary: str, unit: str = "ms"
    ) -> None:
        if not values:
            self.note(f"{section} / {name}: no samples")
            return
        s = summary(values)
        self.series.append(
            {"section": section, "name": name, "boundary": boundary, "unit": unit, **s}
        )
        print(
            f"  {name:<34} n={s['n']:<4} p50={s['p50']:8.2f} p95={s['p95']:8.2f}"
            f" p99={s['p99']:8.2f} max={s['max']:8.2f} {unit}   [{boundary}]",
            flush=True,
        )

    def value(self, section: str, name: str, unit: str, value: float, boundary: str) -> None:
        self.series.append(
            {"section": section, "name": name, "boundary": boundary, "unit": unit, "value": value}
        )
        print(f"  {name:<34} {value:10.3f} {unit}   [{boundary}]", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def p50(self, section: str, name: str) -> float | None:
        return self.quantile(section, name, "p50")

    def quantile(self, section: str, name: str, which: str) -> float | None:
        """`which` ("p50", "p95", "p99", "max") of a series, None if it was not measured."""
        for s in self.series:
            if s["section"] == section and s["name"] == name and which in s:
                return float(s[which])
        return None

    def write(self, path: Path, meta: dict[str, Any]) -> None:
        path.write_text(json.dumps({**meta, "series": self.series, "notes": self.notes}, indent=1))


@dataclass
class Bench:
    work: Path
    server: Server
    image: str
    _task_dirs: list[Path] | None = None

    @property
    def layout(self) -> Path:
        return self.work / "demo-image"

    @property
    def token(self) -> str:
        return (self.server.data_dir / "token").read_text().strip()

    def pool(self, name: str, *extra: str, agents: int = 1, per_agent: int = 10) -> None:
        made = self.server.fsb(
            "pool", "create", name, "--min", str(agents), "--max", str(agents),
            "--per-agent", str(per_agent), *extra,
        )  # fmt: skip
        if made.returncode != 0:
            raise RuntimeError(f"pool {name}: {made.stderr.strip()}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = self.server.fsb("pool", "get", name, "-o", "json")
            if got.returncode == 0:
                ready = json.loads(got.stdout)["status"]["agents"].get("ready", 0)
                if ready >= agents:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"pool {name}: {agents} agents not ready in 120 s")

    def try_pool(self, name: str, *args: str) -> str | None:
        """Make a pool with extra CLI flags; the refusal's message when it is refused."""
        made = self.server.fsb("pool", "create", name, *args)
        return None if made.returncode == 0 else (made.stderr.strip() or made.stdout.strip())

    def slot_markers(self) -> list[Path]:
        """Where the marker would appear in each warm slot ready now (`w-<hex>` containers: a
        claimed slot keeps its id, so the sandbox's own id names no rootfs)."""
        if self._task_dirs is None:
            self._task_dirs = list(self.server.data_dir.rglob("io.containerd.runtime.v2.task"))
        return [r / MARKER for t in self._task_dirs for r in t.glob("*/w-*/rootfs")]

    def marker(self, container_id: str) -> Path | None:
        """Where the marker of `container_id` appears on the host (its rootfs), or None."""
        if self._task_dirs is None:
            self._task_dirs = list(self.server.data_dir.rglob("io.containerd.runtime.v2.task"))
        for task_dir in self._task_dirs:
            for candidate in task_dir.glob(f"*/{container_id}/rootfs"):
                return candidate / MARKER
        return None


def wait_marker(path: Path | list[Path] | None, timeout: float = 30.0) -> float | None:
    """time.perf_counter() when `path` (or any of a list) is first seen (None: never, or no
    path)."""
    if not path:
        return None
    paths = path if isinstance(path, list) else [path]
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if any(p.exists() for p in paths):
            return time.perf_counter()
        time.sleep(0.0002)
    return None


def _keep_logs(data_dir: Path) -> None:
    """FSB_BENCH_LOGS=DIR: copy the run's logs (the server's, its agents', their containers')
    there before the data dir goes, to see afterwards why a run went wrong."""
    keep = os.environ.get("FSB_BENCH_LOGS")
    if not keep:
        return
    for log in data_dir.rglob("*.log"):
        if log.is_file():
            to = Path(keep) / log.relative_to(data_dir)
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(log, to)
    print(f"logs of this run kept in {keep}", flush=True)


@contextlib.contextmanager
def bench_server(*server_args: str) -> Iterator[Bench]:
    if os.geteuid() != 0:
        raise SystemExit("run as root (it starts containerd and containers)")
    # A timeout's SIGTERM must still run the cleanup below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = Path(tempfile.mkdtemp(prefix="fsb-bench-", dir="/tmp"))
    registry_addr = f"127.0.0.1:{free_port()}"
    server = new_server(registry_addr, *server_args)
    try:
        subprocess.run(
            [str(ROOT / "scripts/demo-registry"), str(work), registry_addr],
            check=True,
            capture_output=True,
        )
        server.start()
        # The SDK finds the server's generated token through the data dir, as the CLI does.
        os.environ["FSB_DATA_DIR"] = str(server.data_dir)
        os.environ["FSB_ENDPOINT"] = server.endpoint
        yield Bench(work, server, f"{registry_addr}/busybox:latest")
    finally:
        _keep_logs(server.data_dir)
        purge(server)
        with contextlib.suppress(Exception):
            out = subprocess.run(
                ["pgrep", "-f", f"{work}/registry/config.yml"], capture_output=True, text=True
            ).stdout.split()
            for pid in out:
                os.kill(int(pid), signal.SIGTERM)
        shutil.rmtree(work, ignore_errors=True)


async def wait_slot(client: Any, pool: str, bound: float = 60.0) -> None:
    """Until the pool shows a ready warm slot (the refill after the last claim), untimed."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        got = await client.get_pool(pool)
        if any(w.ready for w in got.status.warm_slots):
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"pool {pool}: no warm slot ready in {bound:.0f} s")
