"""The fake servers' loop thread stops only once every handler has unwound: a handler still
cleaning up when the server stops (reaping a child, closing a channel) finishes its cleanup
instead of being destroyed with the loop (an unraisable ResourceWarning in a later test)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tests.unit.loop_thread import drain_tasks, serve_in_thread

METHOD = "/test.Slow/Hang"


async def test_a_cancelled_handler_finishes_its_cleanup_before_the_server_is_gone() -> None:
    entered = threading.Event()
    unwound = threading.Event()

    async def hang(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            yield b"started"
            entered.set()
            await asyncio.Event().wait()  # until the server's stop cancels it
        finally:
            # Cleanup that takes a few loop turns and some time, as reaping a child does.
            await asyncio.sleep(0.2)
            unwound.set()

    def add(server: grpc.aio.Server) -> str:
        handler = grpc.unary_stream_rpc_method_handler(hang)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Slow", {"Hang": handler}),)
        )
        return f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"

    with serve_in_thread(add) as endpoint:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            call = channel.unary_stream(METHOD)(b"")
            assert await call.read() == b"started"
            await asyncio.to_thread(entered.wait, 30)
            call.cancel()
    assert unwound.is_set()


async def test_drain_cancels_what_outlives_its_timeout() -> None:
    forever = asyncio.create_task(asyncio.Event().wait())
    await drain_tasks(timeout=0.05)
    assert forever.cancelled()


def test_a_server_that_cannot_start_says_so() -> None:
    def add(server: grpc.aio.Server) -> str:
        raise OSError("no port for you")

    with pytest.raises(RuntimeError, match="did not start"), serve_in_thread(add):
        pass
