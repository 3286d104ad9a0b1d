"""`fsb run`'s "pulling IMAGE…" line: said while a create waits for an image pull.

The mechanism, and why it is honest: the server does not stream a create's progress, so before
the create the CLI reads the pool's `status.cachedImages` (the union of what its agents report
having). When no agent of the pool has the image, the create will pull it, and while the create
call is outstanding a line on stderr says so with the seconds elapsed. Afterwards the reply's
`timings.pulledMs` — measured by the agent around its pull — confirms it: the line is replaced by
"pulled IMAGE in N s", or simply erased when no pull happened after all (another create pulled it
meanwhile). A pull the pool's status did not predict (the image is cached on another agent than
the one chosen) is still reported after the fact from `pulledMs`.

Only on a terminal: in a pipe or a script stderr stays clean.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, TextIO

TICK_SECONDS = 0.5


class _Pools(Protocol):
    def get_pool(self, name: str, *, namespace: str | None = None) -> Any: ...


class _Out(Protocol):
    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


class PullProgress:
    def __init__(self, image: str, stream: _Out, predicted: bool) -> None:
        self.image = image
        self.stream = stream
        self.predicted = predicted
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._began = time.monotonic()

    def start(self) -> None:
        if self.predicted:
            self._thread = threading.Thread(target=self._tick, name="pull-progress", daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        while True:
            elapsed = time.monotonic() - self._began
            self.stream.write(f"\r\x1b[Kpulling {self.image}… {elapsed:.0f}s")
            self.stream.flush()
            if self._stop.wait(TICK_SECONDS):
                return

    def _end_line(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def done(self, pulled_ms: float | None) -> None:
        """The create answered: say how long the pull took (the agent's measurement)."""
        self._end_line()
        if pulled_ms:
            self.stream.write(f"pulled {self.image} in {pulled_ms / 1000:.1f}s\n")
            self.stream.flush()

    def abort(self) -> None:
        self._end_line()


def needs_pull(pools: _Pools, image: str, options: Mapping[str, Any]) -> bool:
    """Whether no agent of the create's pool has the image (best effort: False when unsure)."""
    from fastsandbox.api.images import normalize_image_ref
    from fastsandbox.errors import FsbError
    from fastsandbox.sdk._core import DEFAULT_POOL

    try:
        ref = normalize_image_ref(image)
        pool = pools.get_pool(
            str(options.get("pool") or DEFAULT_POOL), namespace=options.get("namespace")
        )
    except FsbError:
        return False  # the create itself reports a bad image or a missing pool
    cached = {normalize_image_ref(i) for i in pool.status.cached_images}
    return ref not in cached


@contextlib.contextmanager
def pull_progress(
    pools: _Pools, image: str, options: Mapping[str, Any], *, stream: TextIO | None = None
) -> Iterator[PullProgress]:
    import sys

    out = stream if stream is not None else sys.stderr
    tty = out.isatty() and bool(image)
    predicted = tty and needs_pull(pools, image, options)
    progress = PullProgress(image, out if tty else _Silent(), predicted)
    progress.start()
    try:
        yield progress
    finally:
        progress.abort()


class _Silent:
    """stderr when it is not a terminal: the progress says nothing."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
