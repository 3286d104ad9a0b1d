"""A grpc.aio server on its own event loop in a thread, for the unit tier's fake servers.

Synchronous callers (`CliRunner.invoke`, the sync SDK) and the test's own loop can both call it
without deadlocking. Stopping it is where the care goes: `server.stop(grace=None)` cancels the
in-flight RPCs but does not wait for their handlers to unwind, so a handler still reaping a
child (the fake agent's `sleep 30` after a refused exec) was destroyed with the loop under load
and its `Popen`/transport/socket surfaced as an unraisable ResourceWarning in whatever test ran
next. Here the loop runs every task left to its end, closes async generators and is closed by
its own thread before the context manager returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc

# Far longer than unwinding takes (a SIGKILLed child is reaped in milliseconds) so a loaded
# machine never hits it; past it the remaining tasks are cancelled, never left pending.
DRAIN_SECONDS = 30.0


async def drain_tasks(timeout: float = DRAIN_SECONDS) -> None:
    """Wait for every other task of the running loop to end (cancel what outlives `timeout`)."""
    me = asyncio.current_task()
    while pending := {t for t in asyncio.all_tasks() if t is not me and not t.done()}:
        _, still = await asyncio.wait(pending, timeout=timeout)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=timeout)
            return


@contextlib.contextmanager
def serve_in_thread(
    add: Callable[[grpc.aio.Server], str],
    *,
    interceptors: Sequence[Any] = (),
    cleanup: Callable[[], Awaitable[None]] | None = None,
    name: str = "fake server",
) -> Iterator[str]:
    """Serve what `add` puts on a new server (it returns the address to yield) until exit;
    then stop the server, run `cleanup` and every task left, on the server's own loop."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        server = grpc.aio.server(interceptors=list(interceptors))
        state["address"] = add(server)
        state["stop"] = asyncio.Event()
        await server.start()
        started.set()
        try:
            await state["stop"].wait()
        finally:
            await server.stop(grace=None)
            if cleanup is not None:
                await cleanup()
            await drain_tasks()

    def run() -> None:
        try:
            loop.run_until_complete(main())
            loop.run_until_complete(loop.shutdown_asyncgens())
        except BaseException as exc:  # shown to the test by the join below
            state["error"] = exc
        finally:
            started.set()
            loop.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    started.wait()
    if "error" in state or "stop" not in state:
        thread.join()
        raise RuntimeError(f"{name} did not start") from state.get("error")
    try:
        yield state["address"]
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join()
        if "error" in state:
            raise RuntimeError(f"{name} did not stop cleanly") from state["error"]
