"""Spare writable-layer images, formatted ahead of time so that a cold create skips `mkfs.ext4`.

Why: the size-limited layer (`disk.py`) needs a fresh ext4 of the asked size, and its mkfs
measured 6-9 ms of every cold create here, on the request's path and its cores. A spare is
the same image made earlier: `.spare-<size>-<n>.img` under the layers' root, formatted with
empty `upper/` and `work/` in it (so it serves both mount modes of `disk.py`), never mounted.
A create takes one by **rename** to `<id>.img`: atomic, and from then on the file has the
container's name, so every cleanup path (the create's own, delete, the janitor's sweep) finds
it as if it had been made for that container.

The refill makes one spare at a time, for the sizes asked most recently (`MAX_SIZES`, up to
`per_size` each), and only while **no create is in flight** (`busy()`) and has not been for a
quiet moment: a background mkfs must not take the two cores from a create.

Nothing leaks: the spares are plain files (no mount, no loop device). `close` deletes them
(agent stop); the first use after a start deletes any a previous run left in this root; the
janitor deletes spares older than its orphan timeout (an agent that died and never came back).
A spare that vanished under us (the janitor) is skipped: the create makes its image itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SPARE_PREFIX = ".spare-"
# Spares per size an agent keeps: one cold create takes one, and back-to-back creates find the
# second while the first is refilled.
DEFAULT_SPARE_LAYERS = 2
# A pool asks one size (its default) almost always; a second covers a request that asks its own.
MAX_SIZES = 2
# How long no create must have been in flight before a refill starts its mkfs.
QUIET_SECONDS = 0.05
# After a failed refill (disk full, mkfs missing) before trying again; creates do not wait.
RETRY_SECONDS = 5.0


class SpareLayers:
    """Formatted images kept ready under `root`; `format_image(path, size)` makes one (and
    removes what it made when it fails)."""

    def __init__(
        self,
        root: Path,
        format_image: Callable[[Path, int], Awaitable[None]],
        *,
        per_size: int = DEFAULT_SPARE_LAYERS,
        quiet: float = QUIET_SECONDS,
    ) -> None:
        self.root = root
        self.per_size = per_size
        self.quiet = quiet
        self._format = format_image
        self._ready: dict[int, list[Path]] = {}
        self._sizes: list[int] = []  # most recently asked last
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._names = itertools.count()
        self._swept = False

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Held by every create for its whole span: the refill waits while any is."""
        self._busy += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    def take(self, size_bytes: int, dest: Path) -> bool:
        """Move a ready spare of exactly `size_bytes` to `dest`; False when there is none (the
        caller formats its own). Either way the size is remembered and the refill woken."""
        if self.per_size <= 0:
            return False
        self._want(size_bytes)
        ready = self._ready.get(size_bytes, [])
        while ready:
            spare = ready.pop()
            try:
                spare.rename(dest)
            except FileNotFoundError:
                continue  # swept by the janitor: try the next
            return True
        return False

    def count(self, size_bytes: int) -> int:
        return len(self._ready.get(size_bytes, ()))

    def _want(self, size_bytes: int) -> None:
        if not self._swept:
            self._swept = True
            self.sweep()
        if size_bytes in self._sizes:
            self._sizes.remove(size_bytes)
        self._sizes.append(size_bytes)
        for dropped in self._sizes[:-MAX_SIZES]:
            for path in self._ready.pop(dropped, []):
                path.unlink(missing_ok=True)
        del self._sizes[:-MAX_SIZES]
        self._wake.set()
        if self._task is None:
            # Owned here and awaited by `close`.
            self._task = asyncio.get_running_loop().create_task(self._refill())

    def _needed(self) -> int | None:
        for size in reversed(self._sizes):
            if self.count(size) < self.per_size:
                return size
        return None

    async def _refill(self) -> None:
        while True:
            size = self._needed()
            if size is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._until_quiet()
            if size not in self._sizes:
                continue
            path = self.root / f"{SPARE_PREFIX}{size}-{next(self._names)}.img"
            try:
                await self._format(path, size)
            except Exception as exc:
                path.unlink(missing_ok=True)
                log.warning("could not make a spare layer", extra={"err": str(exc)})
                await asyncio.sleep(RETRY_SECONDS)
                continue
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            if size in self._sizes:
                self._ready.setdefault(size, []).append(path)
            else:
                path.unlink(missing_ok=True)

    async def _until_quiet(self) -> None:
        while True:
            await self._idle.wait()
            await asyncio.sleep(self.quiet)
            if not self._busy:
                return

    def sweep(self) -> list[Path]:
        """Delete every spare under `root` (ours, or a previous run's), and any template
        directory a format cut short left."""
        removed = []
        if self.root.is_dir():
            for path in self.root.glob(f"{SPARE_PREFIX}*"):
                if path.is_dir():  # the template of a format cut short
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    async def close(self) -> None:
        """Stop refilling and delete the spares."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._ready.clear()
        self.sweep()
