"""Reading a sandbox's captured log: what `fsb-logger` wrote, with tail, since and follow.

Why it is shaped this way:
- `fsb-logger` (native/logger, containerd's `binary://` log driver) writes CRI's format, one
  record a line: `<RFC3339Nano> <stdout|stderr> <F|P> <content>`; `P` is a piece of a longer line,
  continued by the next record of the same stream. A line that is not a record is read as
  stdout of unknown time: logs written by containerd's `file://` driver (sandboxes started
  before the logger existed) stay readable.
- The log is capped: the logger renames `<path>` to `<path>.1` when it reaches half the cap, so
  a reader spans `.1` then `<path>`. The current file is opened first: should it be rotated
  between the two opens, `.1` is the very file just opened, and is skipped.
- A follower keeps its open file; when that file has been renamed away (another inode at
  `<path>`) and is read to its end, it moves on to the new `<path>`. A writer faster than the
  follower can rotate twice between two looks; that middle part is lost to the follower, as it
  is to `kubectl logs -f`.
- Records are sent in chunks of one stream and one timestamp (every line of one read by the
  logger has the same), so nothing is lost by batching and a chatty sandbox is not one message
  per line.
- Tail and since scan backwards from the end (bounded by what they ask for), never the whole
  file forwards; since relies on records being in time order, which one writer gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from fastsandbox.errors import Unavailable

STDOUT = "stdout"
STDERR = "stderr"
_STREAMS = {b"stdout": STDOUT, b"stderr": STDERR}

# How often a follower looks for new bytes, how often it asks whether the sandbox still runs
# (a runtime call is dearer than a read), read size, and the most data one chunk carries.
POLL_SECONDS = 0.1
STATE_CHECK_SECONDS = 0.5
READ_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024
# After the sandbox ended: the logger writes an unfinished last line after 200 ms of quiet.
FINAL_WAIT_SECONDS = 0.35


@dataclass(frozen=True, slots=True)
class LogChunk:
    """Output of one stream written at one time: whole lines end with "\\n", a partial line
    does not (its rest comes in a later chunk of the same stream)."""

    stream: str
    timestamp: float  # unix seconds; 0 when unknown
    data: bytes


@dataclass(frozen=True, slots=True)
class _Record:
    stream: str
    timestamp: float
    partial: bool
    content: bytes


def rotated_path(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def log_files(path: Path) -> tuple[Path, Path]:
    """Every file the log of `path` may occupy (for deleting it)."""
    return rotated_path(path), path


class _Parser:
    """Parses record lines; remembers the last timestamp text (runs of lines share it)."""

    def __init__(self) -> None:
        self._ts_text = b""
        self._ts = 0.0

    def _timestamp(self, text: bytes) -> float | None:
        if text == self._ts_text:
            return self._ts
        try:
            ts = datetime.fromisoformat(text.decode("ascii")).timestamp()
        except (ValueError, UnicodeDecodeError):
            return None
        self._ts_text, self._ts = text, ts
        return ts

    def parse(self, line: bytes) -> _Record:
        """`line` without its newline."""
        parts = line.split(b" ", 3)
        if len(parts) >= 3 and parts[2] in (b"F", b"P"):
            stream = _STREAMS.get(parts[1])
            ts = self._timestamp(parts[0]) if stream else None
            if stream is not None and ts is not None:
                content = parts[3] if len(parts) == 4 else b""
                return _Record(stream, ts, parts[2] == b"P", content)
        return _Record(STDOUT, 0.0, False, line)

    def header(self, line: bytes) -> tuple[float, bool]:
        """(timestamp, ends a line) of a record, reading no more than its header."""
        rec = self.parse(line[:64] if len(line) > 64 else line)
        return rec.timestamp, not rec.partial


def _reverse_lines(f: BinaryIO, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line without newline) from the end of `f[:end]` backwards; a last line with no
    newline yet comes first."""
    pos, tail, at_end = end, b"", True
    while pos > 0:
        step = min(READ_BYTES, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step) + tail
        lines = block.split(b"\n")
        cursor = len(block)
        for i in range(len(lines) - 1, 0, -1):
            start = cursor - len(lines[i])
            cursor = start - 1
            if at_end and i == len(lines) - 1 and not lines[i]:
                continue  # the file's final newline ends a line; it starts none
            yield pos + start, lines[i]
        at_end = False
        tail = lines[0]
    if tail:
        yield 0, tail


def _start(
    files: list[BinaryIO], parser: _Parser, tail_lines: int, since_unix: float
) -> tuple[int, int]:
    """(file index, offset) of the first record to send."""
    if tail_lines <= 0 and since_unix <= 0:
        return 0, 0
    if tail_lines <= 0:
        # Everything is new enough when the oldest record is: no need to scan for the start.
        files[0].seek(0)
        first_ts, _ = parser.header(files[0].readline(4096).rstrip(b"\n"))
        if first_ts >= since_unix:
            return 0, 0
    seen = 0
    first = True
    for index in range(len(files) - 1, -1, -1):
        f = files[index]
        end = os.fstat(f.fileno()).st_size
        for offset, line in _reverse_lines(f, end):
            ts, ends_line = parser.header(line)
            if since_unix > 0 and ts < since_unix:
                return index, offset + len(line) + 1
            if ends_line or first:
                seen += 1
            first = False
            if tail_lines > 0 and seen > tail_lines and ends_line:
                return index, offset + len(line) + 1
    return 0, 0


class _Batcher:
    """Joins consecutive records of one stream and timestamp into chunks."""

    def __init__(self, since_unix: float) -> None:
        self.since = since_unix
        self._stream = ""
        self._ts = 0.0
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, rec: _Record) -> LogChunk | None:
        if self.since > 0 and rec.timestamp < self.since:
            return None
        out = None
        if self._parts and (
            rec.stream != self._stream or rec.timestamp != self._ts or self._size >= CHUNK_BYTES
        ):
            out = self.flush()
        if not self._parts:
            self._stream, self._ts = rec.stream, rec.timestamp
        data = rec.content if rec.partial else rec.content + b"\n"
        self._parts.append(data)
        self._size += len(data)
        return out

    def flush(self) -> LogChunk | None:
        if not self._parts:
            return None
        chunk = LogChunk(self._stream, self._ts, b"".join(self._parts))
        self._parts, self._size = [], 0
        return chunk


class _Source:
    """One open log file read forwards, keeping a line not yet ended for the next read."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.rest = b""

    def lines(self) -> Iterator[bytes]:
        """Every whole line readable now."""
        while True:
            block = self.f.read(READ_BYTES)
            if not block:
                return
            block = self.rest + block
            lines = block.split(b"\n")
            self.rest = lines.pop()
            yield from lines

    def remainder(self) -> bytes:
        rest, self.rest = self.rest, b""
        return rest


def _open(path: Path) -> BinaryIO | None:
    try:
        return path.open("rb")
    except FileNotFoundError:
        return None


def _same_file(a: BinaryIO, b: BinaryIO) -> bool:
    sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _replaced(f: BinaryIO, path: Path) -> bool:
    """Whether `path` is no longer the file `f` reads (rotated away, or a new one made)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False  # between the logger's rename and its create: look again later
    own = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino)


async def read_log(
    path: Path,
    *,
    tail_lines: int = 0,
    since_unix: float = 0.0,
    follow: bool = False,
    running: Callable[[], Awaitable[bool]] | None = None,
    closing: asyncio.Event | None = None,
) -> AsyncGenerator[LogChunk, None]:
    """The log at `path` (and its `.1`): the last `tail_lines` lines (0 = all) written at or after
    `since_unix` (0 = from the start); with `follow`, then new output as it comes, until
    `running()` says the sandbox has ended and what it wrote last is read. `closing` set ends a
    follower with Unavailable (the agent is shutting down)."""
    parser = _Parser()
    batcher = _Batcher(since_unix)
    opened: list[BinaryIO] = []

    def reopen() -> _Source | None:
        f = _open(path)
        if f is None:
            return None
        opened.append(f)
        return _Source(f)

    current = _open(path)
    older = _open(rotated_path(path))
    opened.extend(f for f in (current, older) if f is not None)
    if older is not None and current is not None and _same_file(older, current):
        older = None
    files = [f for f in (older, current) if f is not None]
    try:
        if files:
            index, offset = await asyncio.to_thread(_start, files, parser, tail_lines, since_unix)
            files = files[index:]
            for f in files:
                f.seek(0)  # the backward scan moved them
            files[0].seek(offset)
        sources = [_Source(f) for f in files]
        # Everything there now, file by file.
        while len(sources) > 1:
            for chunk in _drain(sources.pop(0), parser, batcher, final=True):
                yield chunk
        source = sources[0] if sources else None
        for chunk in _drain(source, parser, batcher, final=not follow):
            yield chunk
        if not follow:
            return
        next_check = 0.0
        while True:
            if closing is not None and closing.is_set():
                raise Unavailable("agent is shutting down; retry on the restarted agent")
            got = False
            for chunk in _drain(source, parser, batcher, final=False):
                got = True
                yield chunk
            if source is None:
                source = reopen()
                continue_reading = source is not None
            else:
                continue_reading = _replaced(source.f, path)
                if continue_reading:
                    # Rotated away: what it still holds, then the new file from its start.
                    for chunk in _drain(source, parser, batcher, final=True):
                        yield chunk
                    source.f.close()
                    source = reopen()
            if got or continue_reading:
                continue
            now = time.monotonic()
            if running is not None and now >= next_check:
                next_check = now + STATE_CHECK_SECONDS
                if not await running():
                    await asyncio.sleep(FINAL_WAIT_SECONDS)
                    if source is not None and _replaced(source.f, path):
                        for chunk in _drain(source, parser, batcher, final=True):
                            yield chunk
                        source.f.close()
                        source = reopen()
                    for chunk in _drain(source, parser, batcher, final=True):
                        yield chunk
                    return
            await asyncio.sleep(POLL_SECONDS)
    finally:
        for f in opened:
            with contextlib.suppress(OSError):
                f.close()


def _drain(
    source: _Source | None, parser: _Parser, batcher: _Batcher, *, final: bool
) -> Iterator[LogChunk]:
    """Chunks of every whole record readable now; with `final`, also of a last line with no
    newline (an old `file://` log's last words; a record is written with one write)."""
    if source is not None:
        for line in source.lines():
            chunk = batcher.add(parser.parse(line))
            if chunk is not None:
                yield chunk
        if final and (rest := source.remainder()):
            rec = parser.parse(rest)
            if rec.timestamp == 0.0:
                rec = _Record(rec.stream, 0.0, True, rec.content)  # its newline is not there
            chunk = batcher.add(rec)
            if chunk is not None:
                yield chunk
    chunk = batcher.flush()
    if chunk is not None:
        yield chunk
