"""The typed API over one sandbox's channel: processes and files (PROTOCOL.md).

Every stream is pulled by its consumer: a frame is read from the data connection only when the
caller asks for the next chunk, so a slow reader stops the supervisor through the socket's own
flow control and nothing here buffers more than a frame or two.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastsandbox.agent.supervisor.channel import Channel, DataConnection
from fastsandbox.agent.supervisor.errors import translate
from fastsandbox.agent.supervisor.frames import DATA_CHUNK, MAX_DATA, FrameType
from fastsandbox.errors import FailedPrecondition, InvalidArgument, RuntimeFailure, Unavailable


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    path: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    target: str = ""

    @classmethod
    def from_json(cls, value: Any) -> Entry:
        if not isinstance(value, dict):
            raise RuntimeFailure("supervisor sent a malformed file entry")
        return cls(
            name=str(value.get("name", "")),
            path=str(value.get("path", "")),
            type=str(value.get("type", "other")),
            size=int(value.get("size", 0)),
            mode=int(value.get("mode", 0)),
            uid=int(value.get("uid", 0)),
            gid=int(value.get("gid", 0)),
            mtime=float(value.get("mtime", 0.0)),
            target=str(value.get("target", "")),
        )


@dataclass(frozen=True, slots=True)
class ExitStatus:
    code: int
    signal: int | None
    timed_out: bool


@dataclass(frozen=True, slots=True)
class Output:
    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    argv: tuple[str, ...]
    tag: str
    pty: bool
    started_at: float
    attached: bool
    running: bool
    exit_code: int | None
    main: bool


@dataclass(frozen=True, slots=True)
class WatchEvent:
    event: str
    path: str
    type: str


class Process:
    """A process started (or attached to) in the sandbox. Read its output with `events()`
    (stdout and stderr in arrival order, then its `ExitStatus`), or `stdout()`/`stderr()`
    when only one matters; `wait()` discards what is left and returns the status."""

    def __init__(self, sandbox_id: str, pid: int, conn: DataConnection) -> None:
        self.sandbox_id = sandbox_id
        self.pid = pid
        self._conn = conn
        self.status: ExitStatus | None = None

    async def events(self) -> AsyncIterator[Output | ExitStatus]:
        while self.status is None:
            frame = await self._conn.recv()
            if frame is None:
                await self._conn.close()
                raise Unavailable(
                    f"lost the stream of process {self.pid} in sandbox {self.sandbox_id}; "
                    "it keeps running: attach to it again"
                )
            if frame.type is FrameType.STDOUT:
                yield Output("stdout", frame.payload)
            elif frame.type is FrameType.STDERR:
                yield Output("stderr", frame.payload)
            elif frame.type is FrameType.JSON:
                exit_ = frame.json().get("exit")
                if isinstance(exit_, dict):
                    self.status = ExitStatus(
                        code=int(exit_.get("code", -1)),
                        signal=exit_.get("signal"),
                        timed_out=bool(exit_.get("timed_out", False)),
                    )
                    await self._conn.close()
                    yield self.status

    async def _only(self, stream: str) -> AsyncIterator[bytes]:
        async for event in self.events():
            if isinstance(event, Output) and event.stream == stream:
                yield event.data

    def stdout(self) -> AsyncIterator[bytes]:
        return self._only("stdout")

    def stderr(self) -> AsyncIterator[bytes]:
        return self._only("stderr")

    async def wait(self) -> ExitStatus:
        async for _ in self.events():
            pass
        assert self.status is not None
        return self.status

    async def write_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(view), MAX_DATA):
            await self._send(FrameType.DATA, view[i : i + MAX_DATA])

    async def close_stdin(self) -> None:
        await self._send(FrameType.EOF)

    async def signal(self, signum: int) -> None:
        await self._send_json({"signal": signum})

    async def resize(self, cols: int, rows: int) -> None:
        await self._send_json({"resize": {"cols": cols, "rows": rows}})

    async def close(self) -> None:
        """Detach: the process keeps running (its output goes to its ring buffer)."""
        await self._conn.close()

    async def _send(self, kind: FrameType, payload: bytes | memoryview = b"") -> None:
        try:
            await self._conn.send(kind, payload)
        except (ConnectionError, OSError):
            raise self._gone() from None

    async def _send_json(self, value: dict[str, Any]) -> None:
        try:
            await self._conn.send_json(value)
        except (ConnectionError, OSError):
            raise self._gone() from None

    def _gone(self) -> FailedPrecondition:
        return FailedPrecondition(
            f"process {self.pid} in sandbox {self.sandbox_id} has exited or its stream closed"
        )


class FileReader:
    """A file being read: `entry` (size, mode, mtime), then `chunks()`."""

    def __init__(self, sandbox_id: str, entry: Entry, conn: DataConnection) -> None:
        self.sandbox_id = sandbox_id
        self.entry = entry
        self._conn = conn

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                frame = await self._conn.recv()
                if frame is None:
                    raise Unavailable(
                        f"sandbox {self.sandbox_id}: the read of {self.entry.path} was cut off"
                    )
                if frame.type is FrameType.EOF:
                    return
                if frame.type is FrameType.DATA:
                    yield frame.payload
                elif frame.type is FrameType.JSON:
                    raise translate(frame.json().get("error"), self.sandbox_id)
        finally:
            await self._conn.close()

    async def close(self) -> None:
        await self._conn.close()


class SupervisorClient:
    """What the agent asks of one sandbox's supervisor. Errors are `fastsandbox.errors`."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.sandbox_id = channel.sandbox_id

    # -- processes --------------------------------------------------------------------------
    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Sequence[str] = (),
        cwd: str = "",
        user: str = "",
        pty: tuple[int, int] | None = None,
        stdin: bool = False,
        timeout_ms: int = 0,
        tag: str = "",
    ) -> Process:
        if not argv:
            raise InvalidArgument("argv: required (the command to run)")
        reply, conn = await self.channel.open_stream(
            "exec",
            argv=list(argv),
            env=list(env),
            cwd=cwd,
            user=user,
            pty=None if pty is None else {"cols": pty[0], "rows": pty[1]},
            stdin=stdin,
            timeout_ms=timeout_ms,
            tag=tag,
        )
        return Process(self.sandbox_id, int(reply.get("pid", 0)), conn)

    async def attach(self, pid: int) -> Process:
        _, conn = await self.channel.open_stream("attach", pid=pid)
        return Process(self.sandbox_id, pid, conn)

    async def signal(self, pid: int, signum: int) -> None:
        await self.channel.request("signal", pid=pid, signal=signum)

    async def ps(self) -> list[ProcessInfo]:
        reply = await self.channel.request("ps")
        out = []
        for p in reply.get("processes") or ():
            code = p.get("exit_code")
            out.append(
                ProcessInfo(
                    pid=int(p.get("pid", 0)),
                    argv=tuple(str(a) for a in p.get("argv") or ()),
                    tag=str(p.get("tag") or ""),
                    pty=bool(p.get("pty")),
                    started_at=float(p.get("started_at") or 0.0),
                    attached=bool(p.get("attached")),
                    running=bool(p.get("running")),
                    exit_code=None if code is None else int(code),
                    main=bool(p.get("main")),
                )
            )
        return out

    # -- files ------------------------------------------------------------------------------
    async def stat(self, path: str) -> Entry:
        return Entry.from_json((await self.channel.request("stat", path=path)).get("entry"))

    async def list(self, path: str, depth: int = 1) -> list[Entry]:
        reply = await self.channel.request("list", path=path, depth=depth)
        return [Entry.from_json(e) for e in reply.get("entries") or ()]

    async def mkdir(
        self, path: str, *, mode: int | None = None, parents: bool = True, user: str = ""
    ) -> bool:
        fields: dict[str, Any] = {"path": path, "parents": parents, "user": user}
        if mode is not None:
            fields["mode"] = mode
        return bool((await self.channel.request("mkdir", **fields)).get("created"))

    async def move(self, src: str, dst: str) -> Entry:
        return Entry.from_json((await self.channel.request("move", src=src, dst=dst)).get("entry"))

    async def remove(self, path: str, *, recursive: bool = True) -> None:
        await self.channel.request("remove", path=path, recursive=recursive)

    async def setattr(
        self, path: str, *, mode: int | None = None, mtime: float | None = None
    ) -> Entry:
        fields: dict[str, Any] = {"path": path}
        if mode is not None:
            fields["mode"] = mode
        if mtime is not None:
            fields["mtime"] = mtime
        return Entry.from_json((await self.channel.request("setattr", **fields)).get("entry"))

    async def read(self, path: str, offset: int = 0) -> FileReader:
        reply, conn = await self.channel.open_stream("read", path=path, offset=offset)
        return FileReader(self.sandbox_id, Entry.from_json(reply.get("entry")), conn)

    async def write(
        self,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        mode: int | None = None,
        mtime: float | None = None,
        parents: bool = True,
        user: str = "",
    ) -> Entry:
        """Stream `chunks` into `path`; it appears (renamed into place) only once complete.
        If `chunks` raises, the connection is dropped before EOF and the old file stays."""
        fields: dict[str, Any] = {"path": path, "parents": parents, "user": user}
        if mode is not None:
            fields["mode"] = mode
        if mtime is not None:
            fields["mtime"] = mtime
        _, conn = await self.channel.open_stream("write", **fields)
        try:
            try:
                async for chunk in chunks:
                    view = memoryview(chunk)  # slices without copies
                    for i in range(0, len(view), DATA_CHUNK):
                        await conn.send(FrameType.DATA, view[i : i + DATA_CHUNK])
                await conn.send(FrameType.EOF)
            except (ConnectionError, OSError):
                raise Unavailable(
                    f"sandbox {self.sandbox_id}: the write of {path} was cut off"
                ) from None
            frame = await conn.recv()
            if frame is None:
                raise Unavailable(f"sandbox {self.sandbox_id}: no result for the write of {path}")
            result = frame.json()
            if result.get("ok") is not True:
                raise translate(result.get("error"), self.sandbox_id)
            return Entry.from_json(result.get("entry"))
        finally:
            await conn.close()

    async def watch(self, path: str, *, recursive: bool = False) -> AsyncIterator[WatchEvent]:
        """Changes under `path` until the caller stops iterating (which closes the stream)."""
        _, conn = await self.channel.open_stream("watch", path=path, recursive=recursive)
        try:
            while (frame := await conn.recv()) is not None:
                if frame.type is not FrameType.JSON:
                    continue
                event = frame.json()
                with contextlib.suppress(KeyError, TypeError):
                    yield WatchEvent(
                        event=str(event["event"]),
                        path=str(event["path"]),
                        type=str(event.get("type", "")),
                    )
            raise Unavailable(f"sandbox {self.sandbox_id}: the watch of {path} ended")
        finally:
            await conn.close()
