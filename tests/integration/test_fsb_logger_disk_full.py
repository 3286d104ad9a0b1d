"""fsb-logger on a full disk (a tiny tmpfs, so root): the sandbox's writes never block, what
cannot be written is dropped and counted, and the log says so once there is room again."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_fsb_logger import Running, logger_bin, records, start, wait_until

pytestmark = pytest.mark.integration
__all__ = ["logger_bin", "start"]  # fixtures, used by name


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_drops_and_counts_without_blocking(start: object, tiny_disk: Path) -> None:
    filler = tiny_disk / "filler"
    # Room for a few records only. Freed later, the room must outlast whatever of the flood is
    # still in the pipe then (at most two 64 KiB reads, ~4x as records, under the 1 MiB cap).
    filler.write_bytes(b"\0" * (2048 - 32) * 1024)
    r: Running = start(max_bytes=1024 * 1024, path=tiny_disk / "sb.log")  # type: ignore[operator]
    # Far more than the disk holds, and than a pipe buffers: a logger that stopped reading
    # would leave this write blocked.
    r.write(r.out, b"".join(b"line %06d\n" % i for i in range(20_000)))
    r.write(r.err, b"still here\n")
    assert r.proc.stderr is not None
    # The logger says once, on its own stderr (the shim's log), that it is dropping output.
    assert b"No space left on device" in r.proc.stderr.readline()
    filler.unlink()  # room again
    r.write(r.out, b"after\n")
    wait_until(lambda: any(rec[-1] == b"after" for rec in records(r.path)))
    assert r.close() == 0
    recs = records(r.path)
    notes = [rec for rec in recs if rec[1] == b"stderr" and b"fsb-logger:" in rec[3]]
    assert len(notes) == 1, recs[-5:]
    assert b"bytes of output were dropped" in notes[0][3]
    assert b"No space left on device" in notes[0][3]
    # Every record kept is whole: the cut-off part of a failed write was taken back.
    assert all(len(rec) == 4 and rec[2] in (b"F", b"P") for rec in recs)
    assert b"dropped in all" in r.proc.stderr.read()
