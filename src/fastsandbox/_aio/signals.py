"""The one way a long-running command (`fsb server`, `fsb controller`, `fsb janitor`) runs: a
fresh event loop, SIGTERM/SIGINT asking for an orderly stop, and an `FsbError` turned into one
`error: ...` line and its exit code instead of a traceback."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

from fastsandbox._aio import loop
from fastsandbox.errors import FsbError, exit_code_of


def run_until_stopped(body: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `body(stop)`; the first SIGTERM or SIGINT sets `stop`. Returns the exit code."""

    async def main() -> None:
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(sig, stop.set)
        await body(stop)

    try:
        loop.run(main())
    except FsbError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        return exit_code_of(exc)  # the one table, errors.py
    return 0
