"""A fault the store can be told to have, for the fault suite only (tests/fault): a slow disk.

`fsb server --fault-store-delay-file PATH` (hidden) makes the SQLite store wait before each
write, inside the transaction's slot (the writer runs one at a time), as a slow or stalled
disk would: the file holds the seconds to wait, or `hold` to wait until it says otherwise;
absent or empty, no wait. Read on every write, so a test can slow the store down, stall it
and let it go while the server runs. Nothing else here: every other part is the real store.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

HOLD = "hold"
POLL_SECONDS = 0.05


class WriteDelay(Protocol):
    async def before_write(self) -> None:
        """Called before each write transaction, in the writer's slot."""


class DelayFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    async def before_write(self) -> None:
        text = self._read()
        while text == HOLD:
            await asyncio.sleep(POLL_SECONDS)
            text = self._read()
        if not text:
            return
        try:
            seconds = float(text)
        except ValueError:
            log.warning("store delay file unreadable; no delay", extra={"path": str(self.path)})
            return
        if seconds > 0:
            await asyncio.sleep(seconds)
