"""The I/O-free part of reading logs: the request (tail, since) and the records of the reply.

A record is one chunk as the server sends it: bytes of one stream (`"stdout"` or `"stderr"`)
written at one time. Whole lines end with a newline; a line without one continues in a later
record of the same stream (a long line, or one still being written).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2
from fastsandbox.errors import InvalidArgument

Since = float | datetime | timedelta
"""A unix time in seconds, an aware datetime, or how long ago (a timedelta)."""


@dataclass(frozen=True, slots=True)
class LogRecord:
    stream: str
    """"stdout" or "stderr"."""
    data: bytes
    timestamp: float
    """Unix seconds when the sandbox wrote it; 0 when unknown (logs older than fsb-logger)."""


def since_unix(since: Since | None, *, now: float | None = None) -> float:
    """`since` as unix seconds (0 = from the start)."""
    if since is None:
        return 0.0
    if isinstance(since, timedelta):
        if since < timedelta(0):
            raise InvalidArgument("since: a duration must not be negative")
        return (time.time() if now is None else now) - since.total_seconds()
    if isinstance(since, datetime):
        if since.tzinfo is None:
            raise InvalidArgument("since: give a timezone-aware datetime (e.g. UTC)")
        return since.timestamp()
    if since < 0:
        raise InvalidArgument("since: a unix time must not be negative")
    return float(since)


def logs_request(
    namespace: str, name: str, *, follow: bool, tail: int, since: Since | None
) -> fastpath_pb2.LogsRequest:
    if not 0 <= tail <= 2**31 - 1:
        raise InvalidArgument("tail: must be 0 (all lines) or more")
    return fastpath_pb2.LogsRequest(
        namespace=namespace,
        name=name,
        follow=follow,
        tail_lines=tail,
        since_unix=since_unix(since),
    )


def record_from_wire(chunk: fastpath_pb2.LogChunk) -> LogRecord:
    return LogRecord(stream=chunk.stream or "stdout", data=chunk.data, timestamp=chunk.timestamp)
