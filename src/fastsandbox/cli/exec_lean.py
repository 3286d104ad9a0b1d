"""`fsb exec` on the lean client: one Exec call over our own HTTP/2 (cli/wire/), driven by one
`select` loop over the socket, our stdin and a signal wake-up pipe — no grpc, no protobuf
runtime, no asyncio, no threads. An agent shelling out to `fsb exec` pays this on every command;
grpc's import alone costs more than our whole budget (docs/performance.md, "CLI").

What it does is what `cli/exec_run.run_exec` (the SDK path, kept for the forms only grpc can
reach) does, step for step: the same resolution of endpoint, token and TLS trust
(`sdk/_resolve`), the same request, stdout/stderr written as they come, stdin streamed with
`-i` (one read in flight: backpressure), SIGINT/SIGTERM/SIGHUP forwarded to the command
(SIGINT not in raw `-t` mode, where Ctrl-C is a byte), SIGWINCH sent as a resize, raw mode
restored on every way out, `--timeout` + grace then SIGKILL and exit 124, a closed stdout
ending the command with 141, and every failure through `translate_status` into the one error
tree (so the same message and exit code).
"""

from __future__ import annotations

import os
import select
import signal
import time

from fastsandbox.cli import exec_term
from fastsandbox.cli.wire import h2, pb
from fastsandbox.errors import CommandTimeout, FsbError, Unavailable
from fastsandbox.sdk._resolve import translate_status, unreachable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from fastsandbox.sdk._resolve import ClientConfig

EXEC_PATH = "/fastsandbox.v1.FastPath/Exec"
CONNECT_TIMEOUT_SECONDS = 20.0  # grpc's own connect timeout
_PROXY_VARS = ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY")


def usable(config: ClientConfig) -> bool:
    """Whether the lean client reaches `config.endpoint` the way grpc would: a target form it
    knows and no proxy grpc would go through (those stay on the SDK path)."""
    if h2.target(config.endpoint) is None:
        return False
    return config.endpoint.startswith("unix:") or not any(os.environ.get(v) for v in _PROXY_VARS)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _shell_words(argv: list[str]) -> str:
    import shlex  # only for the timeout message

    return shlex.join(argv)


class _Signals:
    """Our signal handlers for the call: each signal is noted and wakes `select` via a pipe."""

    def __init__(self, forwarded: list[int]) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        os.set_blocking(self.read_fd, False)
        self.caught: list[int] = []
        self._previous = {s: signal.signal(s, self._note) for s in forwarded}
        self._wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def _note(self, signum: int, frame: object) -> None:
        self.caught.append(signum)

    def drain(self) -> list[int]:
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass
        caught, self.caught = self.caught, []
        return caught

    def restore(self) -> None:
        signal.set_wakeup_fd(self._wakeup)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        os.close(self.read_fd)
        os.close(self._write_fd)


def run(
    config: ClientConfig,
    name: str,
    argv: list[str],
    *,
    interactive: bool,
    tty: bool,
    env: dict[str, str],
    workdir: str | None,
    user: str | None,
    timeout: float | None,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
) -> int:
    """Run the command; its exit code (`CommandTimeout` past `timeout`, `FsbError`s else)."""
    metadata = config.metadata()  # no token: Unauthenticated before any connection, as the SDK
    where = h2.target(config.endpoint)
    if where is None:
        raise ValueError(f"{config.endpoint}: check usable() first")
    try:
        sock = h2.connect(
            config.endpoint, tls=config.tls, ca_pem=config.ca_pem, timeout=CONNECT_TIMEOUT_SECONDS
        )
    except OSError:  # refused, no socket, no route, DNS, a TLS handshake refused
        raise unreachable(config.endpoint) from None
    try:
        call = h2.Call(sock, authority=where[2], path=EXEC_PATH, metadata=metadata, tls=config.tls)
        return _Exec(call, config.endpoint, stdin_fd, stdout_fd, stderr_fd, tty, timeout).run(
            pb.exec_start(
                config.namespace, name, argv, env=list(env.items()), cwd=workdir or "",
                user=user or "", stdin=interactive, timeout=timeout or 0.0, tag="fsb exec",
                pty=exec_term.size(_term_fd(stdin_fd, stdout_fd)) if tty else None,
            ),
            interactive,
            argv,
        )  # fmt: skip
    except OSError as exc:
        raise Unavailable(f"exec: the connection to {config.endpoint} failed: {exc}") from None
    finally:
        sock.close()


def _term_fd(stdin_fd: int, stdout_fd: int) -> int:
    # The window whose size the command gets: our terminal, on stdin or else on stdout.
    return stdin_fd if exec_term.isatty(stdin_fd) else stdout_fd


class _Exec:
    def __init__(
        self,
        call: h2.Call,
        endpoint: str,
        stdin_fd: int,
        stdout_fd: int,
        stderr_fd: int,
        tty: bool,
        timeout: float | None,
    ) -> None:
        self.call = call
        self.endpoint = endpoint
        self.stdin_fd, self.stdout_fd, self.stderr_fd = stdin_fd, stdout_fd, stderr_fd
        self.tty = tty
        self.timeout = timeout
        self.term_fd = _term_fd(stdin_fd, stdout_fd)

    def _error(self, failure: h2.CallError) -> FsbError:
        return translate_status(failure.status, failure.details, failure.trailing, self.endpoint)

    def _ended(self, started: bool) -> FsbError:
        failure = self.call.status()
        if failure is not None:
            return self._error(failure)
        if not started:
            return Unavailable("exec: the server ended the stream before the process started")
        return Unavailable("exec: the stream ended before the command's exit status came")

    def run(self, start: bytes, interactive: bool, argv: list[str]) -> int:
        forwarded: list[int] = [signal.SIGTERM, signal.SIGHUP]
        if not (self.tty and exec_term.isatty(self.stdin_fd)):
            # In raw mode Ctrl-C is a byte the remote terminal turns into SIGINT itself.
            forwarded.append(signal.SIGINT)
        if self.tty:
            forwarded.append(signal.SIGWINCH)
        signals = _Signals(forwarded)
        raw = exec_term.raw_terminal(self.stdin_fd) if self.tty else None
        try:
            self.call.send(start)
            return self._loop(signals, raw, interactive and self.stdin_fd >= 0, argv)
        except h2.CallError as failure:
            raise self._error(failure) from None
        finally:
            if raw is not None:
                raw.__exit__(None, None, None)
            signals.restore()
            self.call.cancel()

    def _loop(
        self,
        signals: _Signals,
        raw: exec_term.raw_terminal | None,
        reading: bool,
        argv: list[str],
    ) -> int:
        call = self.call
        started = False
        deadline: float | None = None
        held: list[int] = []  # signals caught before the process started: sent once it has
        while True:
            watch: list[int] = [call.sock.fileno(), signals.read_fd]
            if started and reading and not call.pending():
                watch.append(self.stdin_fd)
            if call.buffered():
                ready: list[int] = [call.sock.fileno()]
            else:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready = select.select(watch, [], [], wait)[0]
                if not ready and deadline is not None and time.monotonic() >= deadline:
                    call.send(pb.signal(signal.SIGKILL))
                    raise CommandTimeout(
                        f"command timed out after {self.timeout:g}s: {_shell_words(argv)}"
                    )
            if signals.read_fd in ready:
                held += signals.drain()
            if started and held:
                for signum in held:
                    if signum == signal.SIGWINCH:
                        call.send(pb.resize(*exec_term.size(self.term_fd)))
                    else:
                        call.send(pb.signal(signum))
                held = []
            if self.stdin_fd in ready:
                try:
                    data = os.read(self.stdin_fd, 64 * 1024)
                except OSError:
                    data = b""
                if data:
                    call.send(pb.stdin_data(data))
                else:
                    call.send(pb.close_stdin())
                    reading = False
            if call.sock.fileno() not in ready:
                continue
            for message in call.receive():
                out = pb.exec_output(message)
                if not started:
                    if out.kind != "started":
                        raise Unavailable(
                            "exec: the server ended the stream before the process started"
                        )
                    started = True
                    if self.timeout:
                        deadline = time.monotonic() + self.timeout + exec_term.CLIENT_GRACE_SECONDS
                    if raw is not None:
                        raw.__enter__()
                elif out.kind in ("stdout", "stderr"):
                    try:
                        _write(self.stdout_fd if out.kind == "stdout" else self.stderr_fd, out.data)
                    except BrokenPipeError:
                        # Our reader went away (`fsb exec ... | head -1`): end the command as a
                        # shell pipeline would, quietly, with 128 + SIGPIPE.
                        call.send(pb.signal(signal.SIGKILL))
                        try:  # noqa: SIM105 (contextlib is an import we do without)
                            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stdout_fd)
                        except OSError:
                            pass
                        return 128 + signal.SIGPIPE
                elif out.kind == "exited":
                    if out.timed_out:
                        raise CommandTimeout(
                            f"command timed out after {self.timeout:g}s: {_shell_words(argv)}"
                        )
                    return out.exit_code
            if call.ended:
                raise self._ended(started)
