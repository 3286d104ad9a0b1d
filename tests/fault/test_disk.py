"""The data dir's disk full (issue 12), against a real `fsb server` whose data dir (SQLite
store, containerd root, agents' state) lives on a small ext4 filesystem this test makes on a
loop device:

- full: a create fails with an error that says so (non-zero exit, a message, no traceback), the
  server stays up and reads still work; once space returns, creates work again by themselves;
- then the SQLite store passes `PRAGMA integrity_check`, every acknowledged sandbox is there and
  Running, a refused one was never half-made; nothing leaks.

A read-only data dir is tests/fault/test_readonly.py (on a FUSE mount: `mount -o remount,ro`
is refused while the server holds files open for writing).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e._server import Server, free_port, purge
from tests.fault.conftest import created_again, make_pool, report, settled_leaks, until

pytestmark = pytest.mark.e2e

POOL = "disk"
SIZE = "768M"
BOUND = 90.0


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def small_fs() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="fsb-disk-", dir="/tmp"))
    image, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    _sh("truncate", "-s", SIZE, str(image))
    _sh("mkfs.ext4", "-q", "-F", "-m", "0", str(image))  # -m 0: no blocks reserved for root
    _sh("mount", "-o", "loop", str(image), str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


def _run(server: Server, name: str, image: str) -> subprocess.CompletedProcess[str]:
    return server.fsb(
        "run", name, "--image", image, "--pool", POOL, "--", "sleep", "3600", timeout=BOUND
    )


def _refused_clearly(got: subprocess.CompletedProcess[str], what: str) -> str:
    assert got.returncode != 0, f"a create succeeded on a {what} data dir"
    message = got.stderr.strip()
    assert message and "Traceback" not in message, got.stderr
    return message.splitlines()[-1][:140]


def _fill(root: Path) -> None:
    filler = root / "filler"
    free = shutil.disk_usage(root).free
    subprocess.run(["fallocate", "-l", str(max(free - 4096, 4096)), str(filler)], check=False)
    # What fallocate could not take (metadata rounding), byte by byte until ENOSPC.
    with contextlib.suppress(OSError), (root / "filler2").open("wb") as out:
        while True:
            out.write(b"\0" * 4096)
            out.flush()


def test_a_full_data_dir(small_fs: Path, registry_addr: str, demo_image: str) -> None:
    server = Server(
        data_dir=small_fs / "data",
        endpoint=f"127.0.0.1:{free_port()}",
        registry=registry_addr,
        extra_args=["--orphan-timeout", "600"],
    )
    server.data_dir.mkdir()
    acked: list[str] = []
    refused: list[str] = []
    try:
        server.start()
        make_pool(server, POOL, agents=1, per_agent=8)
        assert _run(server, "before", demo_image).returncode == 0
        acked.append("before")

        _fill(small_fs)
        full = _refused_clearly(_run(server, "when-full", demo_image), "full")
        assert server.fsb("get", "before").returncode == 0, "reads stopped on a full disk"
        (small_fs / "filler").unlink(missing_ok=True)
        (small_fs / "filler2").unlink(missing_ok=True)
        acked.append(
            created_again(
                "after-full",
                lambda n: _run(server, n, demo_image).returncode == 0,
                refused,
                BOUND,
            )
        )

        for name in acked:
            assert server.fsb_json("get", name)["status"]["phase"] == "Running", name
        for name in ["when-full", *refused]:  # refused: never half-made
            until(f"{name} absent", lambda n=name: server.fsb("get", n).returncode == 3, 30)
        inv, found = settled_leaks(server, (POOL,))
        server.stop()
        check = _sh("sqlite3", str(server.data_dir / "state.db"), "PRAGMA integrity_check;")
        assert check.strip() == "ok", check
        report(
            "disk full", inv, found, acknowledged=len(acked),
            integrity_check=check.strip(), full_error=repr(full),
        )  # fmt: skip
    finally:
        purge(server)
