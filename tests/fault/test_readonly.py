"""The data dir read-only (issue 12), against a real `fsb server` whose data dir (SQLite store,
token, TLS, agents' state, channels and logs) is a FUSE mount this test makes
(`tests/fault/_rofs.py`) and turns read-only while everything runs — files open for writing
included, as a disk that goes read-only does. containerd's own root is a real directory
mounted over `<data dir>/containerd` (overlayfs takes no FUSE upper layer), so what goes
read-only is everything fsb writes.

- read-only: a create (Fast and Strong) and a delete fail with an error naming the cause
  (gRPC UNAVAILABLE, "read-only"), reads work, the running sandbox keeps running;
- writable again: creates and the delete work by themselves (no restart);
- then the records match what runs (the leak check) and, the server stopped, the SQLite file
  passes `PRAGMA integrity_check`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e._server import Server, free_port, purge
from tests.fault.conftest import created_again, make_pool, report, settled_leaks, until

pytestmark = pytest.mark.e2e

POOL = "ro"
BOUND = 90.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Switch:
    mount: Path
    flag: Path

    def read_only(self, on: bool) -> None:
        if on:
            self.flag.touch()
        else:
            self.flag.unlink(missing_ok=True)


@pytest.fixture
def switchable() -> Iterator[Switch]:
    work = Path(tempfile.mkdtemp(prefix="fsb-ro-", dir="/tmp"))
    backing, mount, real_ctd = work / "backing", work / "mnt", work / "containerd"
    for d in (backing, mount, real_ctd):
        d.mkdir()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tests.fault._rofs", str(backing), str(mount), str(work / "ro")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        until("the FUSE mount", lambda: os.path.ismount(mount) or daemon.poll() is not None, 30)
        assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
        (mount / "data" / "containerd").mkdir(parents=True)
        subprocess.run(
            ["mount", "--bind", str(real_ctd), str(mount / "data" / "containerd")], check=True
        )
        yield Switch(mount, work / "ro")
    finally:
        (work / "ro").unlink(missing_ok=True)
        subprocess.run(["umount", "-l", str(mount / "data" / "containerd")],
                       capture_output=True, check=False)  # fmt: skip
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        if daemon.stderr is not None:
            daemon.stderr.close()
        shutil.rmtree(work, ignore_errors=True)


def _run(server: Server, name: str, image: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return server.fsb(
        "run", name, "--image", image, "--pool", POOL, *extra, "--", "sleep", "3600",
        timeout=BOUND,
    )  # fmt: skip


def _refused_naming_the_cause(got: subprocess.CompletedProcess[str], what: str) -> str:
    assert got.returncode != 0, f"{what} succeeded on a read-only data dir"
    message = got.stderr.strip()
    assert message and "Traceback" not in message, got.stderr
    assert "read-only" in message.lower(), f"{what}: the cause is not named: {message}"
    assert "space is back" not in message, f"{what}: read-only told as a full disk: {message}"
    return message.splitlines()[-1][:160]


def test_a_read_only_data_dir(switchable: Switch, registry_addr: str, demo_image: str) -> None:
    server = Server(
        data_dir=switchable.mount / "data",
        endpoint=f"127.0.0.1:{free_port()}",
        registry=registry_addr,
        extra_args=["--orphan-timeout", "600"],
    )
    acked: list[str] = []
    refused: list[str] = []
    try:
        server.start()
        make_pool(server, POOL, agents=1, per_agent=8)
        assert _run(server, "before", demo_image).returncode == 0
        acked.append("before")
        container = server.fsb_json("get", "before")["status"]["containerID"]

        switchable.read_only(True)
        started = time.monotonic()
        fast = _refused_naming_the_cause(_run(server, "ro-fast", demo_image), "a Fast create")
        strong = _refused_naming_the_cause(
            _run(server, "ro-strong", demo_image, "--mode", "strong"), "a Strong create"
        )
        delete = _refused_naming_the_cause(server.fsb("delete", "before"), "a delete")
        refused_s = time.monotonic() - started
        assert server.fsb_json("get", "before")["status"]["phase"] == "Running"
        assert container in server.running_tasks(), "the running sandbox stopped"

        switchable.read_only(False)
        acked.append(
            created_again(
                "after-ro",
                lambda n: _run(server, n, demo_image).returncode == 0,
                refused,
                BOUND,
            )
        )
        assert _run(server, "after-strong", demo_image, "--mode", "strong").returncode == 0
        acked.append("after-strong")
        deleted = server.fsb("delete", "before", "--wait", timeout=BOUND)
        assert deleted.returncode == 0, deleted.stderr
        acked.remove("before")

        for name in acked:
            assert server.fsb_json("get", name)["status"]["phase"] == "Running", name
        for name in ["ro-fast", "ro-strong", "before", *refused]:  # never half-made
            until(f"{name} absent", lambda n=name: server.fsb("get", n).returncode == 3, 30)
        inv, found = settled_leaks(server, (POOL,))
        server.stop()
        check = subprocess.run(
            ["sqlite3", str(server.data_dir / "state.db"), "PRAGMA integrity_check;"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        assert check == "ok", check
        report(
            "read-only data dir", inv, found, acknowledged=len(acked), integrity_check=check,
            refused_s=f"{refused_s:.2f}", retries_after=len(refused),
            fast_error=repr(fast), strong_error=repr(strong), delete_error=repr(delete),
        )  # fmt: skip
    finally:
        switchable.read_only(False)
        purge(server)
