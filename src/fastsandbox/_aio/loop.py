"""The event loop the long-running processes (server, controller, agents) run on.

`FSB_EVENT_LOOP=uvloop` runs them on uvloop when it is installed (it is not a dependency);
anything else, or uvloop missing, is asyncio's own loop. The default stays asyncio: measured
under a 100-create burst (docs/performance.md, "uvloop") it did not change where the time goes,
which is the runtime's processes, not our event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
EVENT_LOOP_ENV = "FSB_EVENT_LOOP"


def _factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get(EVENT_LOOP_ENV, "asyncio") != "uvloop":
        return None
    try:
        # Optional (not a dependency): looked up by name so type checks need no stubs for it.
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        log.warning("FSB_EVENT_LOOP=uvloop but uvloop is not installed; using asyncio's loop")
        return None
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the chosen loop."""
    with asyncio.Runner(loop_factory=_factory()) as runner:
        return runner.run(main)
