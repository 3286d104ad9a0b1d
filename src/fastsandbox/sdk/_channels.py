"""Channels shared by the `AsyncClient`s of one event loop, kept open a while after the last one
closes: the connection pool of an HTTP client, for grpc.

Why: a new channel costs a TCP connect, a TLS handshake and the HTTP/2 preface before its first
call answers, about 4 ms of a 17 ms create-then-run on this machine (docs/performance.md, time
to interactive). `AsyncSandbox.create()` makes a client per sandbox, so a script that makes
sandbox after sandbox paid it every time. Clients of one loop to the same endpoint, with the
same trust (CA or plaintext) and channel options, now use one channel. Sharing never mixes
credentials: the token travels with each call (`_resolve.Config.metadata`), not the channel.

A channel no client uses is closed after `LINGER_SECONDS`, or when its loop winds down
(`asyncio.run` and `asyncio.Runner` cancel the waiting task, which then closes it), so nothing
is left open on a loop that is gone. Channels are per loop because a grpc.aio channel belongs
to the loop it was made in (the sync `Client` runs its own loop and does not linger).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import grpc

LINGER_SECONDS = 30.0


@dataclass(slots=True, eq=False)
class Lease:
    """One channel and how many clients hold it; a client keeps its `Lease` to give it back."""

    key: Hashable
    channel: grpc.aio.Channel
    users: int = 0
    idle: asyncio.Task[None] | None = field(default=None)


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, Lease]] = (
    weakref.WeakKeyDictionary()
)


# Closes under way (a task nobody awaits must be referenced until it is done).
_closing: set[asyncio.Task[None]] = set()


def acquire(key: Hashable, make: Callable[[], grpc.aio.Channel]) -> Lease:
    """The running loop's channel for `key`, made with `make()` when it has none it can use."""
    shared = _by_loop.setdefault(asyncio.get_running_loop(), {})
    lease = shared.get(key)
    if lease is not None and _failing(lease.channel):
        # In reconnect backoff (the server was away): a fresh channel connects at once, as a
        # new client always did. The old one closes when its last user gives it back.
        del shared[key]
        if lease.users == 0:
            _stop_lingering(lease)
        lease = None
    if lease is None:
        lease = shared[key] = Lease(key, make())
    elif lease.idle is not None:
        lease.idle.cancel()
        lease.idle = None
    lease.users += 1
    return lease


async def release(lease: Lease, linger: float = LINGER_SECONDS) -> None:
    """One user fewer; the last one leaves the channel open `linger` seconds (0: closed now)."""
    lease.users -= 1
    if lease.users > 0:
        return
    loop = asyncio.get_running_loop()
    shared = _by_loop.get(loop, {})
    if linger <= 0 or shared.get(lease.key) is not lease:
        if shared.get(lease.key) is lease:
            del shared[lease.key]
        await lease.channel.close(grace=None)
        return
    lease.idle = loop.create_task(_close_when_idle(shared, lease, linger))


def forget() -> None:
    """The running loop's next clients connect anew; open channels close once given back."""
    for lease in _by_loop.pop(asyncio.get_running_loop(), {}).values():
        if lease.users == 0:
            _stop_lingering(lease)


def _failing(channel: grpc.aio.Channel) -> bool:
    return channel.get_state(try_to_connect=False) is grpc.ChannelConnectivity.TRANSIENT_FAILURE


def _stop_lingering(lease: Lease) -> None:
    """Close an idle channel that left the pool now, not at the end of its linger."""
    if lease.idle is not None:
        lease.idle.cancel()
        lease.idle = None
    closing = asyncio.get_running_loop().create_task(lease.channel.close(grace=None))
    _closing.add(closing)
    closing.add_done_callback(_closing.discard)


async def _close_when_idle(shared: dict[Hashable, Lease], lease: Lease, linger: float) -> None:
    try:
        await asyncio.sleep(linger)
    except asyncio.CancelledError:
        if lease.users > 0 or shared.get(lease.key) is not lease:
            raise  # acquired again (it stays open), or retired (`_stop_lingering` closes it)
        # The loop winds down with the channel idle: close it on the way out.
    if shared.get(lease.key) is lease:
        del shared[lease.key]
    with contextlib.suppress(Exception):
        await lease.channel.close(grace=None)
