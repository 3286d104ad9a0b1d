"""Sandbox logs through the real shim: containerd starts fsb-logger (`binary://`), which keeps
stdout and stderr apart, stamps every line and caps the log; `agent/logs.py` reads it back.

Waits are bounded polls on what the log holds; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from fastsandbox.agent.logger_binary import find_logger
from fastsandbox.agent.logs import LogChunk, read_log, rotated_path
from fastsandbox.agent.runtime.base import ContainerSpec, ContainerStatus
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from tests.infra import ContainerdProc

pytestmark = pytest.mark.integration
BOUND = 60.0
# Containers a test started, deleted by the `runtime` fixture whatever the test's outcome.
MADE: list[str] = []


@pytest.fixture
def logger_path() -> str:
    found = find_logger()
    if found is None:
        pytest.fail("fsb-logger is not built: run scripts/setup (or scripts/build-native)")
    return str(found)


@pytest.fixture
async def runtime(
    containerd: ContainerdProc, demo_image: str, tmp_path: Path
) -> AsyncIterator[ContainerdRuntime]:
    rt = ContainerdRuntime(
        containerd.socket, "fastsandbox", [demo_image.split("/", 1)[0]], state_dir=tmp_path
    )
    await rt.pull(demo_image)
    try:
        yield rt
    finally:
        for cid in MADE:
            await rt.delete(cid, 0)
        MADE.clear()
        await rt.close()


async def start(
    rt: ContainerdRuntime, cid: str, script: str, demo_image: str, tmp_path: Path, **kw: object
) -> Path:
    log = tmp_path / "logs" / f"{cid}.log"
    spec = ContainerSpec(
        id=cid,
        image=demo_image,
        log_path=str(log),
        command=("sh", "-c", script),
        **kw,  # type: ignore[arg-type]
    )
    MADE.append(cid)
    await rt.create(spec)
    return log


async def read_all(path: Path, **kw: object) -> list[LogChunk]:
    return [c async for c in read_log(path, **kw)]  # type: ignore[arg-type]


def joined(chunks: list[LogChunk], stream: str) -> bytes:
    return b"".join(c.data for c in chunks if c.stream == stream)


async def until(check: Callable[[], object]) -> None:
    async with asyncio.timeout(BOUND):
        while not check():
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("oci_runtime", ["runc", "gvisor"])
async def test_both_streams_apart_with_timestamps_tail_and_since(
    runtime: ContainerdRuntime,
    demo_image: str,
    cgroup_parent: str,
    logger_path: str,
    tmp_path: Path,
    oci_runtime: str,
) -> None:
    if oci_runtime == "gvisor" and shutil.which("runsc") is None:
        pytest.skip("runsc is not installed")
    began = time.time()
    script = "echo out1; echo err1 >&2; echo out2; sleep 1; echo err2 >&2; printf 'no newline'"
    log = await start(
        runtime, "logs-streams", script, demo_image, tmp_path,
        cgroup_parent=cgroup_parent, logger_path=logger_path, log_max_bytes=1024 * 1024,
        runtime=oci_runtime,
    )  # fmt: skip

    async def running() -> bool:
        return (await runtime.get("logs-streams")).status is not ContainerStatus.STOPPED

    # Follow ends once the sandbox has exited and its last (unfinished) line is read.
    async with asyncio.timeout(BOUND):
        followed = [c async for c in read_log(log, follow=True, running=running)]
    assert joined(followed, "stdout") == b"out1\nout2\nno newline"
    assert joined(followed, "stderr") == b"err1\nerr2\n"
    chunks = await read_all(log)
    assert joined(chunks, "stdout") == b"out1\nout2\nno newline"
    stamps = [c.timestamp for c in chunks]
    assert stamps == sorted(stamps)
    assert began - 60 < stamps[0] and stamps[-1] < time.time() + 60  # sane wall-clock times
    # The CRI format on disk, as kubelet would read it.
    first = log.read_bytes().split(b"\n", 1)[0].split(b" ", 3)
    assert first[1:] == [b"stdout", b"F", b"out1"] and first[0].endswith(b"Z")

    assert joined(await read_all(log, tail_lines=2), "stderr") == b"err2\n"
    assert joined(await read_all(log, tail_lines=2), "stdout") == b"no newline"
    # `since` the time err2 was written: what came before the `sleep 1` is left out.
    (err2,) = [c for c in chunks if c.data == b"err2\n"]
    since = await read_all(log, since_unix=err2.timestamp)
    assert joined(since, "stderr") == b"err2\n"
    assert joined(since, "stdout") == b"no newline"


async def test_a_sandbox_printing_forever_keeps_its_log_under_the_cap(
    runtime: ContainerdRuntime,
    demo_image: str,
    cgroup_parent: str,
    logger_path: str,
    tmp_path: Path,
) -> None:
    cap = 64 * 1024
    log = await start(
        runtime, "logs-yes", "yes", demo_image, tmp_path,
        cgroup_parent=cgroup_parent, logger_path=logger_path, log_max_bytes=cap,
    )  # fmt: skip
    inodes: set[int] = set()
    biggest = 0

    def rotated_a_few_times() -> bool:
        nonlocal biggest
        sizes = 0
        for p in (log, rotated_path(log)):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            sizes += st.st_size
            inodes.add(st.st_ino)
        biggest = max(biggest, sizes)
        assert sizes <= cap, f"{sizes} bytes on disk, cap {cap}"
        return len(inodes) >= 6

    await until(rotated_a_few_times)
    assert (await runtime.get("logs-yes")).status is ContainerStatus.RUNNING  # never blocked
    tail = await read_all(log, tail_lines=3)
    assert joined(tail, "stdout") == b"y\ny\ny\n"
    print(f"yes: {len(inodes)} files seen, at most {biggest} bytes on disk (cap {cap})")
