"""`fsb logs` pieces that need no server: --since parsing and --timestamps stamping."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fastsandbox.cli.commands.logs import _Stamper, format_timestamp, parse_since
from fastsandbox.errors import InvalidArgument

NOW = datetime(2026, 12, 1, 21, 0, tzinfo=UTC).timestamp()


def test_since_takes_durations_and_rfc3339_times() -> None:
    assert parse_since("90s", now=NOW) == NOW - 90
    assert parse_since("1h30m", now=NOW) == NOW - 5400
    assert parse_since("1.5m", now=NOW) == NOW - 90
    assert parse_since("250ms", now=NOW) == NOW - 0.25
    assert parse_since("2d", now=NOW) == NOW - 2 * 86400
    assert parse_since("100000d", now=NOW) == 0.0  # before the epoch: everything
    assert parse_since("2026-12-01T20:00:00Z") == NOW - 3600
    assert parse_since("2026-12-01T21:00:00.5+01:00") == NOW - 3600 + 0.5
    for bad in ("yesterday", "10", "5x", "-5m", "m", "2026-12-01T20:00:00"):
        with pytest.raises(InvalidArgument, match="--since"):
            parse_since(bad, now=NOW)


def test_each_line_is_stamped_once_at_its_start() -> None:
    stamp = _Stamper()
    t1, t2 = NOW, NOW + 1.25
    assert format_timestamp(t1) == b"2026-12-01T21:00:00.000000Z"
    assert stamp(b"a\nb\n", t1) == b"2026-12-01T21:00:00.000000Z a\n2026-12-01T21:00:00.000000Z b\n"
    # A line in pieces: stamped when it starts, not again when it goes on.
    assert stamp(b"start ", t1) == b"2026-12-01T21:00:00.000000Z start "
    assert stamp(b"end\nnext", t2) == b"end\n2026-12-01T21:00:01.250000Z next"
    assert stamp(b"\n", t2) == b"\n"
    assert format_timestamp(0.0) == b"-"
