"""Work that, once started, runs to its end even when its caller is cancelled.

A store write stopped between a backend's statements would leave a transaction open on a shared
connection (or a committed change never counted and published); an apiserver request abandoned
mid-exchange leaves the caller not knowing whether it happened. `to_the_end` lets such work
finish, then passes the caller's cancellation on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def to_the_end(work: Awaitable[T]) -> T:
    """`await work`, shielded: a cancel of the caller waits for the work to end and is then
    raised (the work's result is dropped); a cancel of the work itself propagates as usual."""
    task = asyncio.ensure_future(work)
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        # Whatever the work's outcome: had its own failure (an Unavailable of an apiserver
        # that is down) been raised instead, the caller's `except FsbError` would carry on as
        # if never cancelled, and a loop told to stop (a leader stepping down) would run on.
        if not task.cancelled():
            task.exception()  # retrieved: the caller hears of its cancellation instead
        raise asyncio.CancelledError
    return task.result()
