"""Guarded long-lived tasks: a loop that crashes is logged and restarted with backoff instead of
dying silently, and every task is owned by a group that is cancelled and awaited on shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


async def guarded(
    name: str,
    loop: Callable[[], Awaitable[None]],
    *,
    backoff: float = 0.5,
    max_backoff: float = 10.0,
) -> None:
    """Run `loop()` forever; restart it after an unexpected error, with capped backoff."""
    delay = backoff
    while True:
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background loop crashed; restarting", extra={"loop": name})
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff)


class TaskSet:
    """Owns background tasks; `close()` cancels and awaits them (ordered shutdown)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "background task failed",
                exc_info=task.exception(),
                extra={"task": task.get_name()},
            )

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
