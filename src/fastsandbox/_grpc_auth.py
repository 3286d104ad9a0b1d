"""Bearer-token authentication for our gRPC servers (the Fast-Path and the agent API).

Shared by `control` and `agent`, which never import each other: the check is the same on both
(`authorization: Bearer <token>`, compared in constant time), only the hint telling a refused
caller where the token comes from differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeAlias

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates a client to a `TokenAuth` server."""
    return (("authorization", f"Bearer {token}"),)


# How long a refused client-streaming call may take to finish sending before it is answered.
DRAIN_SECONDS = 1.0


async def drain(requests: Any) -> None:
    """Read what the client sends, until it half-closes (or for DRAIN_SECONDS).

    Answering a client-streaming call while the client is still writing races with its
    half-close, and the client may then read INTERNAL ("Internal error from Core") instead of
    the refusal; draining first lets it finish. A client that keeps sending is answered anyway
    when the time is up.
    """

    async def read_all() -> None:
        async for _ in requests:
            pass

    with contextlib.suppress(TimeoutError, grpc.RpcError):
        await asyncio.wait_for(read_all(), DRAIN_SECONDS)


def same_shape(handler: Handler, unary: Any, stream: Any) -> Handler:
    """A handler with `handler`'s (de)serializers and streaming shape, running `unary` (an
    async function) for a unary response or `stream` (an async generator) for a streamed one."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


def deny(
    handler: Handler,
    message: str,
    code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED,
    *,
    trailers: tuple[tuple[str, str], ...] = (),
) -> Handler:
    """A handler of the same shape as `handler` (unary or streaming) that only refuses, with
    `trailers` as trailing metadata; a client-streaming call is drained first (`drain`)."""

    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if handler.request_streaming:
            await drain(request)
        if trailers:
            context.set_trailing_metadata(trailers)
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort(request, context)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    return same_shape(handler, abort, stream)


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuse every call without the right bearer token, except the `exempt` methods.

    The refusal messages tell the caller where the token is configured.
    """

    def __init__(
        self,
        token: str,
        *,
        exempt: Iterable[str] = (HEALTH_CHECK,),
        missing: str = "missing API token: use --token-file or set FSB_TOKEN",
        invalid: str = "invalid API token: check --token-file / FSB_TOKEN",
    ) -> None:
        if not token:
            raise ValueError("an empty token would let anyone in")
        self._expected = f"Bearer {token}".encode()
        self._exempt = frozenset(exempt)
        self._missing = missing
        self._invalid = invalid

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if details.method in self._exempt or handler is None:
            return handler
        given = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, str) else value.decode()
        if not given:
            return deny(handler, self._missing)
        if not hmac.compare_digest(given.encode(), self._expected):
            return deny(handler, self._invalid)
        return handler
