"""fsb-logger run the way containerd's shim runs it: stdout pipe on fd 3, stderr on fd 4, a
ready pipe on fd 5, arguments as the URI query's pairs. No container needed.

What the agent reads back goes through `agent/logs.py`, so this also checks the two agree.
Timeouts only bound a failing test; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastsandbox.agent.logs import read_log, rotated_path

REPO = Path(__file__).resolve().parents[2]
BOUND = 20.0


@pytest.fixture(scope="module")
def logger_bin() -> Path:
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not Path(cargo).exists():
        pytest.skip("no cargo to build native/logger; install Rust (rustup)")
    result = subprocess.run(
        [str(REPO / "scripts" / "build-native")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    path = REPO / "native" / "bin" / "fsb-logger"
    assert str(path) in result.stdout.split()
    return path


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    out: int
    err: int
    path: Path

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def close(self) -> int:
        for fd in (self.out, self.err):
            os.close(fd)
        return self.proc.wait(BOUND)


@pytest.fixture
def start(logger_bin: Path, tmp_path: Path) -> Iterator[object]:
    started: list[Running] = []

    def run(max_bytes: int = 10 * 1024 * 1024) -> Running:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ready_r, ready_w = os.pipe()
        path = tmp_path / "logs" / "sb-1.log"
        # The shim's argument order is a Go map's: any; the pairs stay together.
        argv = [str(logger_bin), "max-bytes", str(max_bytes), "path", str(path)]
        script = (
            f'exec 3<&{out_r} 4<&{err_r} 5>&{ready_w} {out_r}<&- {err_r}<&- {ready_w}>&-; exec "$@"'
        )
        proc = subprocess.Popen(
            ["/bin/bash", "-c", script, "bash", *argv],
            pass_fds=(out_r, err_r, ready_w),
            env={"CONTAINER_ID": "sb-1", "CONTAINER_NAMESPACE": "test"},
            stderr=subprocess.PIPE,
        )
        for fd in (out_r, err_r, ready_w):
            os.close(fd)
        # Ready: the logger closed fd 5 (EOF here), with its log file open.
        assert os.read(ready_r, 1) == b""
        os.close(ready_r)
        assert path.exists()
        running = Running(proc, out_w, err_w, path)
        started.append(running)
        return running

    yield run
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait(BOUND)
        if r.proc.stderr is not None:
            r.proc.stderr.close()
        for fd in (r.out, r.err):
            with contextlib.suppress(OSError):
                os.close(fd)


def records(path: Path) -> list[list[bytes]]:
    files = [rotated_path(path), path]
    data = b"".join(p.read_bytes() for p in files if p.exists())
    return [line.split(b" ", 3) for line in data.splitlines()]


def wait_until(check: object) -> None:
    deadline = time.monotonic() + BOUND
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_streams_apart_partial_lines_and_a_clean_end(start: object) -> None:
    r: Running = start()  # type: ignore[operator]
    r.write(r.out, b"hello\nworld\n")
    r.write(r.err, b"oops\n")
    r.write(r.out, b"prompt> ")  # no newline: written as a partial record once idle
    wait_until(lambda: len(records(r.path)) == 4)
    got = [(s, t, c) for _, s, t, c in records(r.path)]
    assert sorted(got) == sorted(
        [
            (b"stdout", b"F", b"hello"),
            (b"stdout", b"F", b"world"),
            (b"stderr", b"F", b"oops"),
            (b"stdout", b"P", b"prompt> "),
        ]
    )
    stamp = records(r.path)[0][0].decode()
    assert len(stamp) == 30 and stamp.endswith("Z") and stamp[10] == "T"
    # The shim sends SIGTERM after closing its pipe ends; the logger finishes reading first.
    r.proc.send_signal(signal.SIGTERM)
    r.write(r.out, b"y" * 40_000 + b"\n")  # longer than a line: cut into P records
    assert r.close() == 0
    tail = records(r.path)[-3:]
    assert [t for _, _, t, _ in tail] == [b"P", b"P", b"F"]
    assert b"".join(c for *_, c in tail) == b"y" * 40_000

    async def read_back() -> dict[str, bytes]:
        out: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        async for chunk in read_log(r.path):
            out[chunk.stream] += chunk.data
        return out

    back = asyncio.run(read_back())
    assert back["stderr"] == b"oops\n"
    assert back["stdout"] == b"hello\nworld\nprompt> " + b"y" * 40_000 + b"\n"


def test_a_sandbox_printing_forever_stays_under_the_cap(start: object) -> None:
    cap = 64 * 1024
    r: Running = start(max_bytes=cap)  # type: ignore[operator]
    block = b"".join(b"line %06d\n" % i for i in range(5000))
    for _ in range(40):  # 2 MB through a 64 KiB cap
        r.write(r.out, block)
    r.write(r.err, b"the end\n")
    assert r.close() == 0
    sizes = [p.stat().st_size for p in (r.path, rotated_path(r.path))]
    assert sum(sizes) <= cap, sizes
    assert sizes[1] > cap // 4, "the older half is kept"
    last = records(r.path)[-1]
    assert (last[1], last[3]) == (b"stderr", b"the end"), "the newest output is kept"


def test_bad_arguments_still_drain_the_pipes(logger_bin: Path) -> None:
    out_r, out_w = os.pipe()
    script = f'exec 3<&{out_r} {out_r}<&-; exec "$@"'
    proc = subprocess.Popen(
        ["/bin/bash", "-c", script, "bash", str(logger_bin), "path", "relative.log"],
        pass_fds=(out_r,),
        stderr=subprocess.PIPE,
    )
    os.close(out_r)
    try:
        # More than a pipe holds: a logger that stopped reading would block this write.
        os.write(out_w, b"x" * 65536)
        os.write(out_w, b"x" * 65536)
    finally:
        os.close(out_w)
    assert proc.wait(BOUND) == 2
    assert proc.stderr is not None
    assert b"must be absolute" in proc.stderr.read()
    proc.stderr.close()
