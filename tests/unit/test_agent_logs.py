"""Reading capped CRI-format logs (`agent/logs.py`): tail, since, rotation, follow."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fastsandbox.agent.logs import LogChunk, log_files, read_log, rotated_path
from fastsandbox.errors import Unavailable

BASE = datetime(2026, 12, 1, 20, 0, tzinfo=UTC).timestamp()


def rec(second: float, stream: str, content: str, tag: str = "F") -> bytes:
    stamp = datetime.fromtimestamp(BASE + second, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    return f"{stamp} {stream} {tag} {content}\n".encode()


async def collect(path: Path, **kw: object) -> list[LogChunk]:
    return [c async for c in read_log(path, **kw)]  # type: ignore[arg-type]


def text(chunks: list[LogChunk], stream: str | None = None) -> bytes:
    return b"".join(c.data for c in chunks if stream is None or c.stream == stream)


async def test_records_are_parsed_and_batched_by_stream_and_time(tmp_path: Path) -> None:
    path = tmp_path / "sb.log"
    path.write_bytes(
        rec(0, "stdout", "a") + rec(0, "stdout", "b") + rec(0, "stderr", "oops")
        + rec(1, "stdout", "c") + rec(2, "stdout", "long ", "P") + rec(3, "stdout", "line")
    )  # fmt: skip
    chunks = await collect(path)
    assert [(c.stream, c.timestamp - BASE, c.data) for c in chunks] == [
        ("stdout", 0, b"a\nb\n"),
        ("stderr", 0, b"oops\n"),
        ("stdout", 1, b"c\n"),
        ("stdout", 2, b"long "),
        ("stdout", 3, b"line\n"),
    ]


async def test_lines_without_the_format_are_stdout_of_unknown_time(tmp_path: Path) -> None:
    # What containerd's file:// driver wrote before fsb-logger existed.
    path = tmp_path / "sb.log"
    path.write_bytes(b"plain\nmore words here\nlast")
    chunks = await collect(path)
    assert {(c.stream, c.timestamp) for c in chunks} == {("stdout", 0.0)}
    assert text(chunks) == b"plain\nmore words here\nlast"
    assert text(await collect(path, tail_lines=1)) == b"last"


async def test_tail_counts_whole_lines_across_both_files(tmp_path: Path) -> None:
    path = tmp_path / "sb.log"
    rotated_path(path).write_bytes(b"".join(rec(i, "stdout", f"old {i}") for i in range(3)))
    path.write_bytes(
        rec(3, "stderr", "new 3") + rec(4, "stdout", "new ", "P") + rec(4, "stdout", "4")
    )
    assert text(await collect(path)) == b"old 0\nold 1\nold 2\nnew 3\nnew 4\n"
    assert text(await collect(path, tail_lines=2)) == b"new 3\nnew 4\n"
    assert text(await collect(path, tail_lines=3)) == b"old 2\nnew 3\nnew 4\n"
    assert text(await collect(path, tail_lines=100)) == b"old 0\nold 1\nold 2\nnew 3\nnew 4\n"
    assert text(await collect(path, tail_lines=2), "stderr") == b"new 3\n"


async def test_tail_spans_read_blocks(tmp_path: Path) -> None:
    path = tmp_path / "sb.log"
    lines = [rec(i, "stdout", f"line {i:06d} " * 20) for i in range(3000)]
    path.write_bytes(b"".join(lines))
    got = text(await collect(path, tail_lines=700)).splitlines()
    assert len(got) == 700
    assert got[0].startswith(b"line 002300 ") and got[-1].startswith(b"line 002999 ")


async def test_since_keeps_what_was_written_from_then_on(tmp_path: Path) -> None:
    path = tmp_path / "sb.log"
    rotated_path(path).write_bytes(rec(0, "stdout", "zero") + rec(1, "stdout", "one"))
    path.write_bytes(rec(2, "stderr", "two") + rec(3, "stdout", "three"))
    assert text(await collect(path, since_unix=BASE + 1)) == b"one\ntwo\nthree\n"
    assert text(await collect(path, since_unix=BASE + 2.5)) == b"three\n"
    assert text(await collect(path, since_unix=BASE + 99)) == b""
    assert text(await collect(path, since_unix=BASE + 1, tail_lines=1)) == b"three\n"
    assert text(await collect(path, since_unix=BASE + 2, tail_lines=5)) == b"two\nthree\n"


async def test_a_file_rotated_between_the_two_opens_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "sb.log"
    path.write_bytes(rec(0, "stdout", "only"))
    rotated_path(path).hardlink_to(path)  # `.1` is the same file as the current one
    assert text(await collect(path)) == b"only\n"


async def test_missing_log_is_empty_and_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "sb.log"
    assert await collect(path) == []
    assert log_files(path) == (tmp_path / "sb.log.1", path)


async def test_follow_moves_on_across_rotations_and_ends_with_the_sandbox(tmp_path: Path) -> None:
    path = tmp_path / "sb.log"
    path.write_bytes(rec(0, "stdout", "first"))
    alive = True

    async def running() -> bool:
        return alive

    got: list[LogChunk] = []
    seen = asyncio.Event()

    async def follow() -> None:
        async for chunk in read_log(path, follow=True, running=running):
            got.append(chunk)
            seen.set()

    task = asyncio.create_task(follow())

    async def wait_for(expected: bytes) -> None:
        async with asyncio.timeout(10):
            while text(got) != expected:
                await asyncio.sleep(0.02)

    await wait_for(b"first\n")
    with path.open("ab") as f:
        f.write(rec(1, "stderr", "second"))
    await wait_for(b"first\nsecond\n")
    # What the logger does at half its cap: rename to .1, start a new file.
    with path.open("ab") as f:
        f.write(rec(2, "stdout", "before rotation"))
    path.replace(rotated_path(path))
    path.write_bytes(rec(3, "stdout", "after rotation"))
    await wait_for(b"first\nsecond\nbefore rotation\nafter rotation\n")
    assert not task.done()
    with path.open("ab") as f:
        f.write(rec(4, "stdout", "last words"))
    alive = False
    async with asyncio.timeout(10):
        await task
    assert text(got) == b"first\nsecond\nbefore rotation\nafter rotation\nlast words\n"
    assert [c.stream for c in got if c.data == b"second\n"] == ["stderr"]


async def test_follow_waits_for_a_log_not_made_yet_and_closing_ends_it(tmp_path: Path) -> None:
    path = tmp_path / "sb.log"
    closing = asyncio.Event()

    async def running() -> bool:
        return True

    got: list[LogChunk] = []

    async def follow() -> None:
        async for chunk in read_log(path, follow=True, running=running, closing=closing):
            got.append(chunk)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.15)
    path.write_bytes(rec(0, "stdout", "hello"))
    async with asyncio.timeout(10):
        while text(got) != b"hello\n":
            await asyncio.sleep(0.02)
    closing.set()
    with pytest.raises(Unavailable):
        async with asyncio.timeout(10):
            await task
