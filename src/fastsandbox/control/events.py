"""`EventRecorder`: what the control plane tells `fsb describe` about an object's life.

Why a recorder in front of `ObjectStore.record_event`: events are diagnostics, so recording one
must never slow down or fail what it describes. `record()` is synchronous and cannot raise: it
puts the event on a bounded queue and returns; one drain task (alive only while there is
something to write) hands events to the store in order. When the store is slow or failing the
queue drops its oldest events and says how many it dropped, rather than grow without bound. An
event that repeats the latest one queued for its object (a retry loop) is counted into it, and
the store merges repeats of its latest stored event the same way, so `Unschedulable (x12)` is
one line, not twelve.

Record an event only once the object is stored: the store drops events of objects it does not
have (there would be nobody to remove them).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from fastsandbox.api.models import Event, Sandbox, SandboxPool, now
from fastsandbox.store.base import EventBatches, ObjectStore

log = logging.getLogger(__name__)

NORMAL: Literal["Normal"] = "Normal"
WARNING: Literal["Warning"] = "Warning"

DEFAULT_QUEUE_SIZE = 2000
# Events wait this long before they are written: the work they describe (its own next store
# writes) goes first, and a burst goes out together, its repeats counted in while queued.
DEFAULT_DELAY = 0.05
# Events written in one batch at most (a store that takes batches: `EventBatches`).
BATCH = 500
# How long `close()` lets queued events reach the store before it drops them.
CLOSE_TIMEOUT = 2.0

_Key = tuple[str, str, str]


@dataclass(slots=True)
class _Queued:
    event: Event


class EventRecorder:
    def __init__(
        self,
        store: ObjectStore,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        delay: float = DEFAULT_DELAY,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self.store = store
        self.clock = clock
        self.delay = delay
        self._queue: deque[_Queued] = deque()
        self._size = max(queue_size, 1)
        # The newest queued entry of each object: a repeat of it is counted, not queued.
        self._latest: dict[_Key, _Queued] = {}
        self._drain: asyncio.Task[None] | None = None
        self._closed = False
        self.dropped = 0
        """Events lost to a full queue or a failing store since the start (for tests, metrics)."""
        self.failed_writes = 0

    def record(
        self,
        obj: Sandbox | SandboxPool,
        reason: str,
        message: str = "",
        *,
        type_: Literal["Normal", "Warning"] = NORMAL,
    ) -> None:
        """Queue one event about `obj` (stamped now); never blocks, never raises."""
        try:
            self._enqueue(obj, reason, message, type_)
        except Exception:  # a diagnostic must never break what it describes
            log.exception("could not queue an event", extra={"reason": reason})

    def warning(self, obj: Sandbox | SandboxPool, reason: str, message: str = "") -> None:
        self.record(obj, reason, message, type_=WARNING)

    def _enqueue(
        self,
        obj: Sandbox | SandboxPool,
        reason: str,
        message: str,
        type_: Literal["Normal", "Warning"],
    ) -> None:
        if self._closed:
            return
        meta = obj.metadata
        event = Event(
            kind=obj.kind,
            namespace=meta.namespace,
            name=meta.name,
            uid=meta.uid,
            type=type_,
            reason=reason,
            message=message,
            timestamp=self.clock(),
        )
        key = (event.kind, event.namespace, event.name)
        queued = self._latest.get(key)
        if queued is not None and _same(queued.event, event):
            queued.event = queued.event.model_copy(
                update={"count": queued.event.count + 1, "timestamp": event.timestamp}
            )
            return
        if len(self._queue) >= self._size:
            self._drop(self._queue.popleft())
        entry = _Queued(event)
        self._queue.append(entry)
        self._latest[key] = entry
        self._start_drain()

    def _drop(self, entry: _Queued) -> None:
        self._forget(entry)
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning(
                "event queue full: dropping the oldest events (is the store slow?)",
                extra={"dropped": self.dropped},
            )

    def _forget(self, entry: _Queued) -> None:
        event = entry.event
        key = (event.kind, event.namespace, event.name)
        if self._latest.get(key) is entry:
            del self._latest[key]

    def _start_drain(self) -> None:
        if self._drain is None or self._drain.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a sync caller in a test): written by the next drain
            self._drain = loop.create_task(self._write_all(), name="event-recorder")

    async def _write_all(self) -> None:
        await asyncio.sleep(self.delay)
        store = self.store
        batches = isinstance(store, EventBatches)
        while self._queue:
            # Taken off the queue (and out of `_latest`) before the write: a repeat recorded
            # while the store works is a new entry, merged by the store instead. A store that
            # takes batches gets every queued event in one write (a burst of creates queues
            # two each), others one by one.
            take = min(len(self._queue), BATCH) if batches else 1
            entries = [self._queue.popleft() for _ in range(take)]
            for entry in entries:
                self._forget(entry)
            events = [entry.event for entry in entries]
            try:
                if isinstance(store, EventBatches):
                    await store.record_events(events)
                else:
                    await store.record_event(events[0])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failed_writes += 1
                self.dropped += len(events)
                if self.failed_writes == 1 or self.failed_writes % 100 == 0:
                    log.warning(
                        "could not record events; dropped",
                        extra={
                            "reason": events[0].reason,
                            "object": f"{events[0].namespace}/{events[0].name}",
                            "events": len(events),
                            "err": str(exc),
                            "failed_writes": self.failed_writes,
                        },
                    )

    async def flush(self) -> None:
        """Wait until every event queued so far has been handed to the store."""
        while self._drain is not None and not self._drain.done():
            await asyncio.wait({self._drain})

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop taking events; give the queued ones `timeout` seconds to reach the store."""
        self._closed = True
        drain = self._drain
        if drain is None or drain.done():
            return
        await asyncio.wait({drain}, timeout=timeout)
        if not drain.done():
            log.warning("events not recorded at shutdown", extra={"queued": len(self._queue)})
            drain.cancel()
            await asyncio.wait({drain})
        self._queue.clear()
        self._latest.clear()


def _same(a: Event, b: Event) -> bool:
    return (a.uid, a.type, a.reason, a.message) == (b.uid, b.type, b.reason, b.message)
