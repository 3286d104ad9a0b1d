"""Per-credential fairness at the Fast-Path's edge: a token bucket per caller, and a cap on the
streams (exec/attach, logs, watch, file transfers) one caller holds open at once.

Keyed by the credential presented — a hash of the `authorization` header, never the token
itself — so the limits hold whoever issues tokens (one admin token, namespace-scoped tokens,
a Kubernetes ServiceAccount's). A call without one shares the key `""`; it is refused by the
token check anyway, and counting it keeps a flood of unauthenticated calls from being free.

Over the rate: RESOURCE_EXHAUSTED, a message naming the limit and when to retry, and trailing
metadata `retry-after` (seconds, decimal) that the SDK turns into `FsbError.retry_after`.
Buckets are kept only while they are not full: a full bucket is the same as none, so the table
is pruned of those when it grows, and random tokens cannot grow it without bound.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from fastsandbox._grpc_auth import HEALTH_CHECK, Handler, deny, same_shape
from fastsandbox.errors import RETRY_AFTER_KEY
from fastsandbox.settings import EdgeLimits

# Past this many buckets, full ones are dropped (they carry no state).
_PRUNE_AT = 4096

Clock = Callable[[], float]


def credential_key(metadata: Any) -> str:
    """A short hash of the bearer credential in `metadata` ("" when there is none)."""
    for key, value in metadata or ():
        if key == "authorization":
            raw = value if isinstance(value, bytes) else str(value).encode()
            return hashlib.sha256(raw).hexdigest()[:24]
    return ""


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class Limiter:
    """The bookkeeping, no gRPC: buckets and open-stream counts per credential key."""

    def __init__(self, limits: EdgeLimits, clock: Clock = time.monotonic) -> None:
        if limits.rate_per_second <= 0 or limits.rate_burst < 1 or limits.max_streams < 1:
            raise ValueError("edge limits must be positive: a zero would switch them off")
        self.limits = limits
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self.streams: dict[str, int] = {}

    def admit(self, key: str) -> float:
        """0.0 when `key` may make a call now, else the seconds to wait."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
            burst = float(self.limits.rate_burst)
            bucket = TokenBucket(self.limits.rate_per_second, burst, burst, now)
            self._buckets[key] = bucket
        return bucket.take(now)

    def open_stream(self, key: str) -> bool:
        count = self.streams.get(key, 0)
        if count >= self.limits.max_streams:
            return False
        self.streams[key] = count + 1
        return True

    def close_stream(self, key: str) -> None:
        count = self.streams.get(key, 0) - 1
        if count > 0:
            self.streams[key] = count
        else:
            self.streams.pop(key, None)


def _behaviour(handler: Handler) -> Callable[..., Any]:
    if handler.request_streaming and handler.response_streaming:
        found: Any = handler.stream_stream
    elif handler.request_streaming:
        found = handler.stream_unary
    elif handler.response_streaming:
        found = handler.unary_stream
    else:
        found = handler.unary_unary
    if found is None:
        raise TypeError("a gRPC method handler without a behaviour")
    return found  # type: ignore[no-any-return]


class Throttle(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Applies a `Limiter` to every call but the health check."""

    def __init__(self, limits: EdgeLimits, clock: Clock = time.monotonic) -> None:
        self.limiter = Limiter(limits, clock)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or details.method == HEALTH_CHECK:
            return handler
        limits = self.limiter.limits
        key = credential_key(details.invocation_metadata)
        wait = self.limiter.admit(key)
        if wait > 0:
            hint = math.ceil(wait * 1000) / 1000
            return deny(
                handler,
                f"rate limit exceeded: {limits.rate_per_second:g} calls/s per token "
                f"(burst {limits.rate_burst}); retry after {hint:.3f}s",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                trailers=((RETRY_AFTER_KEY, f"{hint:.3f}"),),
            )
        if not (handler.request_streaming or handler.response_streaming):
            return handler
        return self._counted(handler, key)

    def _counted(self, handler: Handler, key: str) -> Handler:
        """`handler` holding one of `key`'s stream slots for as long as it runs."""
        limiter = self.limiter
        inner = _behaviour(handler)
        refused = (
            f"too many concurrent streams: at most {limiter.limits.max_streams} "
            "exec/attach/logs/watch/file streams per token; close one first"
        )

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not limiter.open_stream(key):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
            try:
                return await inner(request, context)
            finally:
                limiter.close_stream(key)

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not limiter.open_stream(key):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
            try:
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    async for item in _iterate(result):
                        yield item
                else:
                    await result
            finally:
                limiter.close_stream(key)

        return same_shape(handler, unary, stream)


async def _iterate(gen: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        async for item in gen:
            yield item
    finally:
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            await aclose()
