"""Running commands in a sandbox: `sb.commands.run(...)`, background handles, the Exec stream.

One `ExecSession` is one Fast-Path `Exec` call: inputs (stdin, signals, resizes) go through a
small bounded queue, so a caller writing faster than the sandbox reads waits instead of
buffering; outputs are read one message at a time. `run` collects a command's output into a
`CommandResult` (a non-zero exit is a result, not an error; `check()` raises), or returns a
`CommandHandle` at once with `background=True`. Output reaches `on_stdout` / `on_stderr` as
text as it arrives (decoded incrementally, so a UTF-8 character split across chunks survives).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import inspect
import shlex
import signal as signals
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

import grpc

from fastsandbox.api._proto.fastsandbox.v1 import io_pb2
from fastsandbox.errors import CommandFailed, CommandTimeout, InvalidArgument, Unavailable

if TYPE_CHECKING:
    from fastsandbox.sdk.aio import AsyncClient

OutputCallback = Callable[[str], Any]
"""Called with each piece of text; may be a plain function or a coroutine function."""

DEFAULT_TIMEOUT = 60.0
# The supervisor kills at `timeout`; the client waits this much longer for it to say so before
# deciding on its own (a lost `exited` message must not hang the caller).
_CLIENT_GRACE = 5.0
_INPUT_QUEUE = 16


@dataclass(frozen=True, slots=True)
class CommandResult:
    """A finished command: what it printed and how it ended."""

    exit_code: int
    stdout: str
    stderr: str
    signal: int = 0
    """The signal that killed it, 0 if it exited."""
    pid: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def check(self) -> CommandResult:
        """Raise `CommandFailed` unless it exited 0; returns itself so calls chain."""
        if self.exit_code != 0:
            tail = self.stderr.strip().splitlines()[-1:] or [""]
            raise CommandFailed(
                f"command exited {self.exit_code}" + (f": {tail[0]}" if tail[0] else ""),
                exit_code=self.exit_code,
            )
        return self


def argv_of(cmd: str | Sequence[str]) -> list[str]:
    """A string is a shell command line (`/bin/sh -c`); a list is an argv, run as is."""
    if isinstance(cmd, str):
        if not cmd.strip():
            raise InvalidArgument("start.argv: empty command")
        return ["/bin/sh", "-c", cmd]
    argv = [str(a) for a in cmd]
    if not argv:
        raise InvalidArgument("start.argv: must name a command")
    return argv


def exec_start(
    namespace: str,
    name: str,
    argv: Sequence[str],
    *,
    envs: Mapping[str, str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    stdin: bool = False,
    timeout: float | None = None,
    pty: tuple[int, int] | None = None,
    tag: str = "",
    attach_pid: int = 0,
) -> io_pb2.ExecStart:
    start = io_pb2.ExecStart(
        target=io_pb2.SandboxTarget(namespace=namespace, name=name),
        argv=list(argv),
        env=[io_pb2.KeyValuePair(key=str(k), value=str(v)) for k, v in (envs or {}).items()],
        cwd=cwd or "",
        user=user or "",
        stdin=stdin,
        timeout_seconds=float(timeout or 0),
        tag=tag,
        attach_pid=attach_pid,
    )
    if pty is not None:
        start.pty.cols, start.pty.rows = pty
    return start


class ExecSession:
    """One Exec stream. Read with `next_output()`; write with `send_stdin` / `signal` / ...

    The `start` message is written on the call itself, and later input goes through a writer
    task made on the first `send_*`: a command that never gets input (most `run`s) costs no
    task and no queue hop, only the call's own reads and writes."""

    def __init__(self, client: AsyncClient, start: io_pb2.ExecStart) -> None:
        self._client = client
        self._queue: asyncio.Queue[io_pb2.ExecInput | None] = asyncio.Queue(_INPUT_QUEUE)
        stub, metadata = client._rpc()
        self._call: Any = stub.Exec(metadata=metadata)  # type: ignore[call-arg]
        self._start: io_pb2.ExecStart | None = start
        self._start_written: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self.exited: io_pb2.ExecExited | None = None

    async def _write_start(self) -> None:
        """Write `start` once (the first read waits for it, as does the writer task)."""
        if self._start_written is None:
            self._start_written = asyncio.get_running_loop().create_future()
            start, self._start = self._start, None
            try:
                await self._call.write(io_pb2.ExecInput(start=start))
            except grpc.RpcError:
                pass  # the call failed: the read that follows raises its status
            except (asyncio.InvalidStateError, grpc.aio.UsageError):
                pass  # closed meanwhile
            finally:
                self._start_written.set_result(None)
        else:
            await self._start_written

    async def _inputs(self) -> None:
        await self._write_start()
        try:
            while (msg := await self._queue.get()) is not None:
                await self._call.write(msg)
            await self._call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            pass  # the call ended; its status reaches the reader

    async def started(self) -> int:
        """Wait for the process to start; its pid. Raises the server's error if it cannot."""
        out = await self.next_output()
        if out is None or out.WhichOneof("kind") != "started":
            raise Unavailable("exec: the server ended the stream before the process started")
        return out.started.pid

    async def next_output(self) -> io_pb2.ExecOutput | None:
        """The next message, None after `exited` (or when the stream ends)."""
        if self.exited is not None:
            return None
        if self._start_written is None or not self._start_written.done():
            await self._write_start()
        try:
            out = await self._call.read()
        except grpc.RpcError as err:
            raise self._client._translate(err) from None
        if out is grpc.aio.EOF:  # type: ignore[attr-defined]
            return None
        if out.WhichOneof("kind") == "exited":
            self.exited = out.exited
        return out  # type: ignore[no-any-return]

    async def _put(self, msg: io_pb2.ExecInput) -> None:
        if self.exited is None:
            if self._writer is None:
                self._writer = asyncio.get_running_loop().create_task(self._inputs())
            await self._queue.put(msg)

    async def send_stdin(self, data: bytes | str) -> None:
        await self._put(io_pb2.ExecInput(stdin=data.encode() if isinstance(data, str) else data))

    async def close_stdin(self) -> None:
        await self._put(io_pb2.ExecInput(close_stdin=True))

    async def signal(self, signum: int) -> None:
        await self._put(io_pb2.ExecInput(signal=int(signum)))

    async def resize(self, cols: int, rows: int) -> None:
        await self._put(io_pb2.ExecInput(resize=io_pb2.TermSize(cols=cols, rows=rows)))

    def close(self) -> None:
        """End the call (idempotent); a process still running is the server's to keep or end."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)
        self._call.cancel()
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()


async def _deliver(callback: OutputCallback | None, text: str) -> None:
    if callback is not None and text:
        result = callback(text)
        if inspect.isawaitable(result):
            await result


class CommandHandle:
    """A command running in the sandbox: `wait()` for its result, `kill()` it, feed its stdin."""

    def __init__(
        self,
        session: ExecSession,
        pid: int,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = None,
        cmd: str = "",
        inline: bool = False,
    ) -> None:
        self._session = session
        self.pid = pid
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._timeout = timeout
        self._cmd = cmd
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        # `run` without background reads in its own task (`_wait_inline`): no task per call.
        self._pump_task: asyncio.Task[CommandResult] | None = (
            None if inline else asyncio.get_running_loop().create_task(self._pump())
        )

    def _task(self) -> asyncio.Task[CommandResult]:
        if self._pump_task is None:
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())
        return self._pump_task

    @property
    def stdout(self) -> str:
        """Everything printed so far."""
        return "".join(self._stdout)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    async def _on_data(self, kind: str, data: bytes, decoder: codecs.IncrementalDecoder) -> None:
        text = decoder.decode(data)
        (self._stdout if kind == "stdout" else self._stderr).append(text)
        await _deliver(self._on_stdout if kind == "stdout" else self._on_stderr, text)

    async def _pump(self) -> CommandResult:
        decoders = {k: codecs.getincrementaldecoder("utf-8")("replace") for k in ("o", "e")}
        try:
            while (out := await self._session.next_output()) is not None:
                kind = out.WhichOneof("kind")
                if kind == "stdout":
                    await self._on_data("stdout", out.stdout, decoders["o"])
                elif kind == "stderr":
                    await self._on_data("stderr", out.stderr, decoders["e"])
            for key, kind in (("o", "stdout"), ("e", "stderr")):
                tail = decoders[key].decode(b"", final=True)
                if tail:
                    (self._stdout if kind == "stdout" else self._stderr).append(tail)
            exited = self._session.exited
            if exited is None:
                raise Unavailable("exec: the stream ended before the command's exit status came")
            if exited.timed_out:
                raise CommandTimeout(f"command timed out after {self._timeout:g}s: {self._cmd}")
            return CommandResult(
                exit_code=exited.exit_code,
                stdout=self.stdout,
                stderr=self.stderr,
                signal=exited.signal,
                pid=self.pid,
            )
        finally:
            self._session.close()

    async def wait(self) -> CommandResult:
        """The result once it ends; `CommandTimeout` when it ran past its timeout (then killed)."""
        task = self._task()
        if self._timeout is None:
            return await asyncio.shield(task)
        try:
            async with asyncio.timeout(self._timeout + _CLIENT_GRACE):
                return await asyncio.shield(task)
        except TimeoutError:
            await self.kill()
            task.cancel()
            raise CommandTimeout(
                f"command timed out after {self._timeout:g}s: {self._cmd}"
            ) from None

    async def _wait_inline(self) -> CommandResult:
        """`wait()` reading in the caller's task (the handle was never given out)."""
        if self._pump_task is not None:
            return await self.wait()
        try:
            async with asyncio.timeout(
                None if self._timeout is None else self._timeout + _CLIENT_GRACE
            ):
                return await self._pump()
        except TimeoutError:
            raise CommandTimeout(
                f"command timed out after {self._timeout:g}s: {self._cmd}"
            ) from None

    async def kill(self, signum: int = signals.SIGKILL) -> bool:
        """Send `signum` (SIGKILL) to its process group; False when it had already ended."""
        if self._session.exited is not None or (
            self._pump_task is not None and self._pump_task.done()
        ):
            return False
        await self._session.signal(signum)
        return True

    async def send_stdin(self, data: bytes | str) -> None:
        await self._session.send_stdin(data)

    async def close_stdin(self) -> None:
        await self._session.close_stdin()

    async def disconnect(self) -> None:
        """Stop following it (the process keeps running in the sandbox)."""
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(BaseException):
                await self._pump_task
        self._session.close()


class AsyncCommands:
    """`sb.commands`: run commands in one sandbox."""

    def __init__(self, client: AsyncClient, namespace: str, name: str) -> None:
        self._client = client
        self._namespace = namespace
        self._name = name

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        pty: tuple[int, int] | None = None,
        tag: str = "",
        _inline: bool = False,
    ) -> CommandHandle:
        argv = argv_of(cmd)
        start = exec_start(
            self._namespace,
            self._name,
            argv,
            envs=envs,
            cwd=cwd,
            user=user,
            stdin=stdin,
            timeout=timeout,
            pty=pty,
            tag=tag or "sdk",
        )
        session = ExecSession(self._client, start)
        try:
            pid = await session.started()
        except BaseException:
            session.close()
            raise
        label = cmd if isinstance(cmd, str) else shlex.join(argv)
        return CommandHandle(
            session,
            pid,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            timeout=timeout,
            cmd=label,
            inline=_inline,
        )

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = False,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult: ...

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[True],
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandHandle: ...

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: bool = False,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult | CommandHandle:
        """Run `cmd` (a shell line, or an argv list) and return its `CommandResult`.

        With `background=True`, return a `CommandHandle` as soon as it started. `timeout`
        (seconds, None = no limit) kills it and raises `CommandTimeout`.
        """
        handle = await self.start(
            cmd,
            envs=envs,
            cwd=cwd,
            user=user,
            stdin=stdin,
            timeout=timeout,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            _inline=not background,
        )
        if background:
            return handle
        return await handle._wait_inline()

    async def list(self) -> list[io_pb2.ProcessInfo]:
        """The sandbox's processes (the main one included), as the supervisor sees them."""
        stub, metadata = self._client._rpc()
        request = io_pb2.ProcessesRequest(
            target=io_pb2.SandboxTarget(namespace=self._namespace, name=self._name)
        )
        try:
            reply: io_pb2.ProcessesResponse = await stub.ListProcesses(request, metadata=metadata)
        except grpc.RpcError as err:
            raise self._client._translate(err) from None
        return list(reply.processes)

    async def connect(
        self,
        pid: int,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandHandle:
        """Re-attach to a running process by pid (e.g. one started with `background=True`)."""
        start = exec_start(self._namespace, self._name, [], attach_pid=pid)
        session = ExecSession(self._client, start)
        try:
            started = await session.started()
        except BaseException:
            session.close()
            raise
        return CommandHandle(
            session, started, on_stdout=on_stdout, on_stderr=on_stderr, cmd=f"pid {pid}"
        )


__all__ = [
    "AsyncCommands",
    "CommandHandle",
    "CommandResult",
    "ExecSession",
    "OutputCallback",
]
