"""`RecordBatcher`: the records of answered Fast creates, stored together.

Why: a Fast create answers first and stores its record right after (DESIGN.md §5). Under a
burst, a hundred of them answered within a few hundred milliseconds each made its own store
write — with SQLite one transaction and one hand-off between the event loop and the writer's
thread each, most of the server's CPU after the agents'. Here every record handed in while
the previous write is under way (or in the same turn of the loop) goes into the next write:
one `create_many` (`store.base.BatchCreates`) for all of them.

Nothing changes for the guarantee: a record is stored no earlier than the answer and no later
than one write after it; until then it is served from memory and rebuilt by recovery from the
container's request label after a crash, exactly as before. Each create gets its own
outcome (its stored record or its own error, e.g. AlreadyExists); a failing write (the store
`Unavailable`) fails every record of it, and each caller retries as it did alone. A store
without batches gets one `create` per record.
"""

from __future__ import annotations

import asyncio
import logging

from fastsandbox.api.models import Sandbox
from fastsandbox.errors import FsbError
from fastsandbox.store.base import BatchCreates, ObjectStore

log = logging.getLogger(__name__)

# Records stored in one write at most.
BATCH = 500


class RecordBatcher:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._queue: list[tuple[Sandbox, asyncio.Future[Sandbox]]] = []
        self._drain: asyncio.Task[None] | None = None

    async def create(self, sb: Sandbox) -> Sandbox:
        """`store.create(sb)`, in a write shared with the other records handed in meanwhile."""
        store = self.store
        if not isinstance(store, BatchCreates):
            return await store.create(sb)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Sandbox] = loop.create_future()
        self._queue.append((sb, done))
        if self._drain is None or self._drain.done():
            self._drain = loop.create_task(self._write_all(store), name="record-batcher")
        return await done

    async def _write_all(self, store: BatchCreates) -> None:
        # One turn of the loop first: creates answered in the same turn share the first write.
        await asyncio.sleep(0)
        while self._queue:
            batch, self._queue = self._queue[:BATCH], self._queue[BATCH:]
            try:
                outcomes = await store.create_many([sb for sb, _ in batch])
            except Exception as exc:  # the store failed: every record of it is retried
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            except BaseException:
                # Stopped (the plane closing): as a cancelled `create` would, and recovery
                # rebuilds whatever was not stored.
                for _, done in batch + self._queue:
                    done.cancel()
                self._queue = []
                raise
            for (_, done), outcome in zip(batch, outcomes, strict=True):
                if done.done():
                    continue  # its caller went away; the record is stored all the same
                if isinstance(outcome, FsbError):
                    done.set_exception(outcome)
                else:
                    done.set_result(outcome)
