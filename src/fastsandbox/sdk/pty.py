"""Interactive terminals in a sandbox: `sb.pty.create(cols, rows)` → a `PtyHandle`.

The process gets a PTY of that size (stdout and stderr are the one terminal stream); `send`
types into it, `resize` changes its window (the process sees SIGWINCH), and what it prints
arrives as bytes at `on_data` and in `output` (the newest `OUTPUT_KEPT` bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal as signals
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fastsandbox.errors import Unavailable
from fastsandbox.sdk.commands import ExecSession, argv_of, exec_start

if TYPE_CHECKING:
    from fastsandbox.sdk.aio import AsyncClient

DataCallback = Callable[[bytes], Any]
OUTPUT_KEPT = 1024 * 1024


class PtyHandle:
    def __init__(self, session: ExecSession, pid: int, on_data: DataCallback | None) -> None:
        self._session = session
        self.pid = pid
        self._on_data = on_data
        self._output = bytearray()
        self._changed = asyncio.Condition()
        self.exit_code: int | None = None
        self._task = asyncio.get_running_loop().create_task(self._pump())

    @property
    def output(self) -> bytes:
        return bytes(self._output)

    async def _pump(self) -> int:
        try:
            while (out := await self._session.next_output()) is not None:
                data = out.stdout or out.stderr
                if data:
                    self._output += data
                    del self._output[: max(0, len(self._output) - OUTPUT_KEPT)]
                    if self._on_data is not None:
                        result = self._on_data(data)
                        if inspect.isawaitable(result):
                            await result
                    async with self._changed:
                        self._changed.notify_all()
            exited = self._session.exited
            if exited is None:
                raise Unavailable("pty: the stream ended before the process's exit status came")
            self.exit_code = exited.exit_code
            return exited.exit_code
        finally:
            self._session.close()
            async with self._changed:
                self._changed.notify_all()

    async def send(self, data: bytes | str) -> None:
        """Type `data` into the terminal."""
        await self._session.send_stdin(data)

    async def resize(self, cols: int, rows: int) -> None:
        await self._session.resize(cols, rows)

    async def kill(self, signum: int = signals.SIGKILL) -> bool:
        if self._task.done():
            return False
        await self._session.signal(signum)
        return True

    async def wait(self) -> int:
        """The process's exit code once it ends."""
        return await asyncio.shield(self._task)

    async def wait_for_output(self, needle: bytes, timeout: float = 30.0) -> bytes:
        """Wait until `needle` has been printed (for scripts driving a shell); the output."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: needle in self._output or self._task.done())
        return self.output

    async def disconnect(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


class AsyncPty:
    """`sb.pty`: terminals in one sandbox."""

    def __init__(self, client: AsyncClient, namespace: str, name: str) -> None:
        self._client = client
        self._namespace = namespace
        self._name = name

    async def create(
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
        argv = argv_of(cmd) if isinstance(cmd, str) else list(cmd)
        env = {"TERM": "xterm-256color", **(envs or {})}
        start = exec_start(
            self._namespace,
            self._name,
            argv,
            envs=env,
            cwd=cwd,
            user=user,
            stdin=True,
            timeout=timeout,
            pty=(cols, rows),
            tag="sdk-pty",
        )
        session = ExecSession(self._client, start)
        try:
            pid = await session.started()
        except BaseException:
            session.close()
            raise
        return PtyHandle(session, pid, on_data)
