"""`fsb exec` on the SDK (grpc.aio): run the command in the sandbox, stream its stdio, forward
signals and window size, return its exit code. The command lines typer parses
(cli/commands/exec.py) and the endpoints only grpc reaches end here; the common forms run the
same steps on the lean client (cli/exec_lean.py), and tests/unit/test_cli_exec_lean.py holds
the two to the same bytes, exit codes and error lines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastsandbox.sdk.commands import ExecSession

from fastsandbox.cli.exec_term import (
    CLIENT_GRACE_SECONDS,
    env_pairs,
    raw_terminal,
)
from fastsandbox.cli.exec_term import fileno as _fileno
from fastsandbox.cli.exec_term import isatty as _isatty
from fastsandbox.cli.exec_term import size as _size

__all__ = ["CLIENT_GRACE_SECONDS", "env_pairs", "run_exec"]


def _pump_stdin(session: ExecSession, loop: asyncio.AbstractEventLoop, stream: Any) -> None:
    """Our stdin to the command, one read at a time, waiting for each send (backpressure).

    A daemon thread: a read blocked on a terminal must never keep the process from exiting.
    """
    fd = _fileno(stream)
    if fd >= 0:
        # The raw fd, not the buffered stream: a daemon thread blocked inside a buffered read
        # holds its lock, and the interpreter aborts on that lock at exit.
        def read(size: int) -> bytes:
            return os.read(fd, size)
    else:
        read = getattr(stream, "read1", stream.read)

    def run() -> None:
        try:
            while data := read(64 * 1024):
                asyncio.run_coroutine_threadsafe(session.send_stdin(data), loop).result()
            asyncio.run_coroutine_threadsafe(session.close_stdin(), loop).result()
        except (OSError, ValueError, RuntimeError, asyncio.CancelledError):
            pass  # the loop is gone (we are exiting) or stdin broke: nothing to send to

    threading.Thread(target=run, name="fsb-exec-stdin", daemon=True).start()


async def run_exec(
    name: str,
    argv: list[str],
    *,
    interactive: bool,
    tty: bool,
    env: dict[str, str],
    workdir: str | None,
    user: str | None,
    timeout: float | None,
    endpoint: str | None,
    token_file: str | None,
    namespace: str | None,
    stdin: Any = None,
    stdout: Any = None,
    stderr: Any = None,
) -> int:
    """Run the command and return its exit code (`CommandTimeout` past `timeout`)."""
    from fastsandbox.errors import CommandTimeout
    from fastsandbox.sdk.aio import AsyncClient
    from fastsandbox.sdk.commands import ExecSession, exec_start

    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    stdin_fd = _fileno(stdin)
    # The window whose size the command gets: our terminal, on stdin or else on stdout.
    term_fd = stdin_fd if _isatty(stdin_fd) else _fileno(stdout)
    loop = asyncio.get_running_loop()
    async with AsyncClient(endpoint, None, namespace, token_file=token_file) as client:
        start = exec_start(
            client.namespace,
            name,
            argv,
            envs=env,
            cwd=workdir,
            user=user,
            stdin=interactive,
            timeout=timeout,
            pty=_size(term_fd) if tty else None,
            tag="fsb exec",
        )
        session = ExecSession(client, start)
        try:
            await session.started()
            # Signal handlers cannot await: each send is a task, held until it is done.
            sends: set[asyncio.Task[None]] = set()

            def send(coro: Any) -> None:
                task = loop.create_task(coro)
                sends.add(task)
                task.add_done_callback(sends.discard)

            def forward(signum: int) -> None:
                send(session.signal(signum))

            forwarded = [signal.SIGTERM, signal.SIGHUP]
            if not (tty and _isatty(stdin_fd)):
                # In raw mode Ctrl-C is a byte the remote terminal turns into SIGINT itself.
                forwarded.append(signal.SIGINT)
            for signum in forwarded:
                loop.add_signal_handler(signum, forward, int(signum))
            if tty:
                loop.add_signal_handler(
                    signal.SIGWINCH, lambda: send(session.resize(*_size(term_fd)))
                )
            if interactive:
                _pump_stdin(session, loop, stdin)
            with raw_terminal(stdin_fd) if tty else contextlib.nullcontext():
                try:
                    async with asyncio.timeout(timeout + CLIENT_GRACE_SECONDS if timeout else None):
                        while (out := await session.next_output()) is not None:
                            if out.stdout:
                                stdout.write(out.stdout)
                                stdout.flush()
                            elif out.stderr:
                                stderr.write(out.stderr)
                                stderr.flush()
                except BrokenPipeError:
                    # Our reader went away (`fsb exec ... | head -1`): end the command as a
                    # shell pipeline would, quietly, with 128 + SIGPIPE.
                    await session.signal(signal.SIGKILL)
                    with contextlib.suppress(OSError):
                        os.dup2(os.open(os.devnull, os.O_WRONLY), _fileno(stdout))
                    return 128 + signal.SIGPIPE
                except TimeoutError:
                    await session.signal(signal.SIGKILL)
                    session.exited = None
                    raise CommandTimeout(
                        f"command timed out after {timeout:g}s: {shlex.join(argv)}"
                    ) from None
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH):
                loop.remove_signal_handler(signum)
            session.close()
        exited = session.exited
        if exited is None:
            from fastsandbox.errors import Unavailable

            raise Unavailable("exec: the stream ended before the command's exit status came")
        if exited.timed_out:
            raise CommandTimeout(f"command timed out after {timeout:g}s: {shlex.join(argv)}")
        return int(exited.exit_code)
