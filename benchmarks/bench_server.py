"""One benchmark harness for both create_latency.py and exec_latency.py: a loopback
docker-registry serving the busybox demo image, an `fsb server` with its own containerd in a temp
data dir, and a pool `bench` with one Ready agent; everything removed afterwards, even on a
timeout's SIGTERM."""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e._server import Server, free_port, new_server, purge  # noqa: E402


@dataclass
class Bench:
    server: Server
    image: str
    work: Path

    @property
    def layout(self) -> Path:
        """The demo image as an OCI layout (for the runc/docker baselines)."""
        return self.work / "demo-image"


@contextlib.contextmanager
def bench_server(per_agent: int = 10) -> Iterator[Bench]:
    if os.geteuid() != 0:
        raise SystemExit("run as root (it starts containerd and containers)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # the cleanup below must still run
    work = Path(tempfile.mkdtemp(prefix="fsb-bench-", dir="/tmp"))
    registry_addr = f"127.0.0.1:{free_port()}"
    server = new_server(registry_addr)
    try:
        subprocess.run(
            [str(ROOT / "scripts/demo-registry"), str(work), registry_addr],
            check=True,
            capture_output=True,
        )
        server.start()
        made = server.fsb(
            "pool", "create", "bench", "--min", "1", "--max", "1", "--per-agent", str(per_agent)
        )
        assert made.returncode == 0, made.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = server.fsb("pool", "get", "bench", "-o", "json")
            if got.returncode == 0 and json.loads(got.stdout)["status"]["agents"]["ready"]:
                break
            time.sleep(0.2)
        yield Bench(server, f"{registry_addr}/busybox:latest", work)
    finally:
        purge(server)
        with contextlib.suppress(Exception):
            out = subprocess.run(
                ["pgrep", "-f", f"{work}/registry/config.yml"], capture_output=True, text=True
            ).stdout.split()
            for pid in out:
                os.kill(int(pid), signal.SIGTERM)
        shutil.rmtree(work, ignore_errors=True)
