"""`Sandbox`: the blocking twin of `AsyncSandbox`, with no logic of its own.

    from fastsandbox import Sandbox

    with Sandbox.create(image="busybox") as sb:
        print(sb.commands.run("echo hi").stdout)

Each `Sandbox` runs its `AsyncSandbox` on a private event loop in a daemon thread (as `Client`
does), so it works from plain scripts and from inside someone else's event loop alike; the
lease renewal task lives on that loop, for as long as this process does.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from fastsandbox.sdk._core import DEFAULT_POOL
from fastsandbox.sdk._logs import LogRecord, Since
from fastsandbox.sdk.commands import (
    DEFAULT_TIMEOUT,
    AsyncCommands,
    CommandResult,
    OutputCallback,
)
from fastsandbox.sdk.commands import (
    CommandHandle as AsyncCommandHandle,
)
from fastsandbox.sdk.files import AsyncFiles, EntryInfo, WriteData
from fastsandbox.sdk.pty import AsyncPty, DataCallback
from fastsandbox.sdk.pty import PtyHandle as AsyncPtyHandle
from fastsandbox.sdk.sandbox_aio import AsyncSandbox
from fastsandbox.sdk.sync import _LoopThread, _next

if TYPE_CHECKING:
    from fastsandbox.api import models
    from fastsandbox.api._proto.fastsandbox.v1 import io_pb2

T = TypeVar("T")


def _iterate(loop: _LoopThread, agen: AsyncIterator[T]) -> Iterator[T]:
    try:
        while True:
            try:
                item = loop.run(_next(agen))
            except StopAsyncIteration:
                return
            yield item
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(RuntimeError):
                loop.run(aclose())


class CommandHandle:
    """A command running in the background (see `AsyncCommands.run(background=True)`)."""

    def __init__(self, loop: _LoopThread, handle: AsyncCommandHandle) -> None:
        self._loop = loop
        self._handle = handle
        self.pid = handle.pid

    @property
    def stdout(self) -> str:
        return self._handle.stdout

    @property
    def stderr(self) -> str:
        return self._handle.stderr

    def wait(self) -> CommandResult:
        return self._loop.run(self._handle.wait())

    def kill(self) -> bool:
        return self._loop.run(self._handle.kill())

    def send_stdin(self, data: bytes | str) -> None:
        self._loop.run(self._handle.send_stdin(data))

    def close_stdin(self) -> None:
        self._loop.run(self._handle.close_stdin())

    def disconnect(self) -> None:
        self._loop.run(self._handle.disconnect())


class Commands:
    def __init__(self, loop: _LoopThread, commands: AsyncCommands) -> None:
        self._loop = loop
        self._aio = commands

    @overload
    def run(
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
    def run(
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

    def run(
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
        """Run `cmd`; see `AsyncCommands.run`. Callbacks run on the SDK's loop thread."""
        handle = self._loop.run(
            self._aio.start(
                cmd,
                envs=envs,
                cwd=cwd,
                user=user,
                stdin=stdin,
                timeout=timeout,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        )
        if background:
            return CommandHandle(self._loop, handle)
        return self._loop.run(handle.wait())

    def list(self) -> list[io_pb2.ProcessInfo]:
        return self._loop.run(self._aio.list())

    def connect(
        self,
        pid: int,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandHandle:
        handle = self._loop.run(self._aio.connect(pid, on_stdout=on_stdout, on_stderr=on_stderr))
        return CommandHandle(self._loop, handle)


class Files:
    def __init__(self, loop: _LoopThread, files: AsyncFiles) -> None:
        self._loop = loop
        self._aio = files

    def read(self, path: str) -> bytes:
        return self._loop.run(self._aio.read(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self._loop.run(self._aio.read_text(path, encoding))

    def read_stream(self, path: str, *, offset: int = 0) -> Iterator[bytes]:
        return _iterate(self._loop, self._aio.read_stream(path, offset=offset))

    def write(
        self,
        path: str,
        data: WriteData,
        *,
        mode: int | None = None,
        mtime: float | None = None,
        parents: bool = True,
        user: str | None = None,
    ) -> EntryInfo:
        return self._loop.run(
            self._aio.write(path, data, mode=mode, mtime=mtime, parents=parents, user=user)
        )

    def stat(self, path: str) -> EntryInfo:
        return self._loop.run(self._aio.stat(path))

    def exists(self, path: str) -> bool:
        return self._loop.run(self._aio.exists(path))

    def list(self, path: str, *, depth: int = 1) -> list[EntryInfo]:
        return self._loop.run(self._aio.list(path, depth=depth))

    def mkdir(self, path: str, *, parents: bool = True, mode: int | None = None) -> bool:
        return self._loop.run(self._aio.mkdir(path, parents=parents, mode=mode))

    def move(self, source: str, destination: str) -> None:
        self._loop.run(self._aio.move(source, destination))

    rename = move

    def remove(self, path: str, *, recursive: bool = True) -> None:
        self._loop.run(self._aio.remove(path, recursive=recursive))

    def set_attributes(
        self, path: str, *, mode: int | None = None, mtime: float | None = None
    ) -> None:
        self._loop.run(self._aio.set_attributes(path, mode=mode, mtime=mtime))


class PtyHandle:
    def __init__(self, loop: _LoopThread, handle: AsyncPtyHandle) -> None:
        self._loop = loop
        self._handle = handle
        self.pid = handle.pid

    @property
    def output(self) -> bytes:
        return self._handle.output

    def send(self, data: bytes | str) -> None:
        self._loop.run(self._handle.send(data))

    def resize(self, cols: int, rows: int) -> None:
        self._loop.run(self._handle.resize(cols, rows))

    def kill(self) -> bool:
        return self._loop.run(self._handle.kill())

    def wait(self) -> int:
        return self._loop.run(self._handle.wait())

    def wait_for_output(self, needle: bytes, timeout: float = 30.0) -> bytes:
        return self._loop.run(self._handle.wait_for_output(needle, timeout))


class Pty:
    def __init__(self, loop: _LoopThread, pty: AsyncPty) -> None:
        self._loop = loop
        self._aio = pty

    def create(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        on_data: DataCallback | None = None,
        cmd: str | Sequence[str] = ("/bin/sh", "-i"),
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
    ) -> PtyHandle:
        handle = self._loop.run(
            self._aio.create(
                cols, rows, on_data=on_data, cmd=cmd, envs=envs, cwd=cwd, user=user, timeout=timeout
            )
        )
        return PtyHandle(self._loop, handle)


class Sandbox:
    """A running sandbox; as a context manager it is deleted (and waited for) on exit."""

    def __init__(self, loop: _LoopThread, sandbox: AsyncSandbox) -> None:
        self._loop = loop
        self._aio = sandbox
        self.commands = Commands(loop, sandbox.commands)
        self.files = Files(loop, sandbox.files)
        self.pty = Pty(loop, sandbox.pty)

    @classmethod
    def create(
        cls,
        image: str,
        *,
        name: str | None = None,
        pool: str = DEFAULT_POOL,
        command: Sequence[str] | str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        ports: Sequence[int] = (),
        ttl: int | None = None,
        lease: int | None = None,
        mode: str = "fast",
        endpoint: str | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
        resources: Mapping[str, str] | None = None,
    ) -> Sandbox:
        """Start a sandbox (see `AsyncSandbox.create`)."""
        loop = _LoopThread()
        try:
            sandbox = loop.run(
                AsyncSandbox.create(
                    image,
                    name=name,
                    pool=pool,
                    command=command,
                    env=env,
                    workdir=workdir,
                    ports=ports,
                    ttl=ttl,
                    lease=lease,
                    mode=mode,
                    endpoint=endpoint,
                    token=token,
                    token_file=token_file,
                    ca_file=ca_file,
                    namespace=namespace,
                    labels=labels,
                    resources=resources,
                )
            )
        except BaseException:
            loop.stop()
            raise
        return cls(loop, sandbox)

    @classmethod
    def connect(
        cls,
        name: str,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        namespace: str | None = None,
    ) -> Sandbox:
        loop = _LoopThread()
        try:
            sandbox = loop.run(
                AsyncSandbox.connect(
                    name,
                    endpoint=endpoint,
                    token=token,
                    token_file=token_file,
                    ca_file=ca_file,
                    namespace=namespace,
                )
            )
        except BaseException:
            loop.stop()
            raise
        return cls(loop, sandbox)

    @property
    def name(self) -> str:
        return self._aio.name

    @property
    def namespace(self) -> str:
        return self._aio.namespace

    @property
    def id(self) -> str:
        return self._aio.id

    @property
    def sandbox_id(self) -> str:
        return self._aio.id

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._aio.endpoints

    @property
    def timings(self) -> models.Timings | None:
        return self._aio.timings

    @property
    def object(self) -> models.Sandbox:
        return self._aio.object

    def refresh(self) -> models.Sandbox:
        return self._loop.run(self._aio.refresh())

    def is_running(self) -> bool:
        return self._loop.run(self._aio.is_running())

    def logs(
        self, *, follow: bool = False, tail: int = 0, since: Since | None = None
    ) -> Iterator[bytes]:
        return _iterate(self._loop, self._aio.logs(follow=follow, tail=tail, since=since))

    def log_records(
        self, *, follow: bool = False, tail: int = 0, since: Since | None = None
    ) -> Iterator[LogRecord]:
        """Its output with stdout and stderr apart (see `Client.log_records`)."""
        return _iterate(self._loop, self._aio.log_records(follow=follow, tail=tail, since=since))

    def set_timeout(self, seconds: int) -> None:
        self._loop.run(self._aio.set_timeout(seconds))

    def get(self) -> models.Sandbox:
        return self._loop.run(self._aio.get())

    def events(self, *, limit: int = 0) -> list[models.Event]:
        return self._loop.run(self._aio.events(limit=limit))

    def update(self, **changes: Any) -> models.Sandbox:
        """Change expiry, labels, failure policy or recovery timeout (see `Client.update`)."""
        return self._loop.run(self._aio.update(**changes))

    def reset(self) -> models.Sandbox:
        return self._loop.run(self._aio.reset())

    def delete(self, *, wait: bool = True) -> None:
        self._loop.run(self._aio.delete(wait=wait))

    def kill(self) -> None:
        """Delete the sandbox now and wait until it is removed."""
        self._loop.run(self._aio.kill())

    def close(self) -> None:
        """Stop renewing, close the connection and the loop thread (the sandbox stays)."""
        if self._loop.closed:
            return
        try:
            self._loop.run(self._aio.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.kill()
        finally:
            self.close()
