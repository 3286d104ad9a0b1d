"""Per-key serial sections: work on one object never interleaves, work on different objects never
waits on each other (no global lock on the create path)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._users: dict[Hashable, int] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if self._users[key] == 0:
                # Forget idle keys so the map does not grow with every sandbox ever seen.
                del self._users[key]
                del self._locks[key]

    def busy(self, key: Hashable) -> bool:
        return key in self._users
