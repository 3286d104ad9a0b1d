"""`fsb logs NAME [-f] [--tail N] [--since WHEN] [--timestamps]`: the sandbox's output, byte for
byte, stdout to stdout and stderr to stderr (like `docker logs`), flushed as it arrives.

With `--timestamps` every line starts with the time the sandbox wrote it (RFC 3339, UTC); a line
that comes in pieces (a long line, or one written bit by bit) is stamped once, at its start.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated, BinaryIO

import typer

from fastsandbox.cli.options import Endpoint, Namespace, SandboxName, TokenFile, client
from fastsandbox.errors import InvalidArgument

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, *, now: float | None = None) -> float:
    """`--since`: a duration ago (`90s`, `10m`, `1h30m`, `2d`) or an RFC 3339 time; unix seconds."""
    text = text.strip()
    parts = _DURATION_PART.findall(text)
    if parts and "".join(n + u for n, u in parts) == text:
        ago = sum(float(n) * _UNITS[u] for n, u in parts)
        return max((time.time() if now is None else now) - ago, 0.0)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            f"--since {text!r}: give a duration (e.g. 10s, 5m, 1h30m) or an RFC 3339 time "
            "(e.g. 2026-12-01T20:00:00Z)"
        ) from None
    if when.tzinfo is None:
        raise InvalidArgument(f"--since {text!r}: give the time zone (e.g. a trailing Z for UTC)")
    return when.timestamp()


def format_timestamp(ts: float) -> bytes:
    if ts <= 0:
        return b"-"  # written before the sandbox's log had timestamps
    when = datetime.fromtimestamp(ts, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


class _Stamper:
    """Puts the timestamp before each line that starts in a chunk of one stream."""

    def __init__(self) -> None:
        self._at_start = True

    def __call__(self, data: bytes, ts: float) -> bytes:
        stamp = format_timestamp(ts) + b" "
        lines = data.split(b"\n")
        out = []
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if last and not line:
                break  # data ended with a newline: the next line starts in a later chunk
            out.append((stamp if self._at_start else b"") + line + (b"" if last else b"\n"))
            self._at_start = not last
        if data.endswith(b"\n"):
            self._at_start = True
        return b"".join(out)


def logs(
    name: SandboxName,
    follow: Annotated[
        bool,
        typer.Option("-f", "--follow", help="Keep streaming until the sandbox ends (or Ctrl-C)."),
    ] = False,
    tail: Annotated[
        int,
        typer.Option("--tail", "-n", min=0, help="Only the last N lines (0 = all).", metavar="N"),
    ] = 0,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only output written since then: a duration ago (10s, 5m, 1h30m) or an "
            "RFC 3339 time.",
            metavar="DURATION|RFC3339",
            show_default=False,
        ),
    ] = None,
    timestamps: Annotated[
        bool, typer.Option("--timestamps", "-t", help="Start each line with its time (UTC).")
    ] = False,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Print a sandbox's stdout (to stdout) and stderr (to stderr)."""
    since_unix = parse_since(since) if since else None
    outs: dict[str, BinaryIO] = {
        "stdout": typer.get_binary_stream("stdout"),
        "stderr": typer.get_binary_stream("stderr"),
    }
    stampers = {"stdout": _Stamper(), "stderr": _Stamper()}
    with client(endpoint, token_file, namespace) as fsb:
        try:
            for record in fsb.log_records(
                name,
                follow=follow,
                tail=tail,
                since=since_unix,
            ):
                stream = "stderr" if record.stream == "stderr" else "stdout"
                data = record.data
                if timestamps:
                    data = stampers[stream](data, record.timestamp)
                out = outs[stream]
                out.write(data)
                out.flush()
        except KeyboardInterrupt:
            pass  # Ctrl-C is how `-f` is meant to end: not a failure
