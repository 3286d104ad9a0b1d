"""What both clients of `fsb exec` share about our own end: `-e` pairs, the terminal's size, raw
mode. Imports nothing heavier than termios, so the lean client (cli/exec_lean.py) stays lean."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any

# How much longer than --timeout we wait for the sandbox to report the kill itself.
CLIENT_GRACE_SECONDS = 5.0
DEFAULT_SIZE = (80, 24)


def env_pairs(pairs: list[str]) -> dict[str, str]:
    from fastsandbox.errors import InvalidArgument

    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key:
            raise InvalidArgument(f"--env: {pair!r} is not KEY=VALUE")
        # `-e KEY` alone passes our own value through, as docker does.
        env[key] = value if sep else os.environ.get(key, "")
    return env


def size(fd: int) -> tuple[int, int]:
    if fd < 0:
        return DEFAULT_SIZE
    try:
        cols, rows = os.get_terminal_size(fd)
    except OSError:
        return DEFAULT_SIZE
    return (cols or DEFAULT_SIZE[0], rows or DEFAULT_SIZE[1])


def fileno(stream: Any) -> int:
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return -1


def isatty(fd: int) -> bool:
    return fd >= 0 and os.isatty(fd)


class raw_terminal:
    """Raw mode on `fd` if it is a terminal, restored however we leave."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._saved: list[Any] | None = None

    def __enter__(self) -> None:
        if not isatty(self.fd):
            return
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setraw(self.fd, termios.TCSANOW)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None
