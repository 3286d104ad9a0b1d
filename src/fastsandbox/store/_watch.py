"""In-process fan-out of committed changes to watchers.

Why in-process: one server process owns the store (the SQLite file is not shared between
servers), so every change passes through this process and can be handed to watchers directly
after it is committed, with no polling of the database.

Each watcher has its own bounded buffer. A watcher that falls more than `limit` events behind
could not resume from the retained history either, so it is told to list again (`Conflict`)
rather than letting the buffer grow without end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from fastsandbox.errors import Conflict, Unavailable
from fastsandbox.store.base import EventType


@dataclass(frozen=True, slots=True)
class Record:
    """One committed change as stored: the object body is JSON text, decoded per watcher."""

    resource_version: int
    kind: str
    type: EventType
    body: str


class Subscription:
    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self._limit = limit
        self._pending: deque[Record] = deque()
        self._wake = asyncio.Event()
        self._overflowed = False
        self._closed = False

    def push(self, record: Record) -> None:
        if len(self._pending) >= self._limit:
            self._overflowed = True
        else:
            self._pending.append(record)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def next(self, idle: float) -> Record | None:
        """The next change, or None after `idle` seconds without one (time for a bookmark)."""
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._overflowed:
                raise Conflict("the watch fell too far behind: list again and watch from there")
            if self._closed:
                raise Unavailable("the object store was closed")
            self._wake.clear()
            try:
                async with asyncio.timeout(idle):
                    await self._wake.wait()
            except TimeoutError:
                return None


class Hub:
    """Who watches which kind, and the last resourceVersion handed to them."""

    def __init__(self, last_resource_version: int, limit: int) -> None:
        self.last_resource_version = last_resource_version
        self._limit = limit
        self._subscriptions: set[Subscription] = set()

    def subscribe(self, kind: str) -> Subscription:
        sub = Subscription(kind, self._limit)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def publish(self, record: Record) -> None:
        """Call right after the change is committed, in commit order."""
        self.last_resource_version = record.resource_version
        for sub in self._subscriptions:
            if sub.kind == record.kind:
                sub.push(record)

    def close(self) -> None:
        for sub in self._subscriptions:
            sub.close()
        self._subscriptions.clear()
