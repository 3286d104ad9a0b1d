"""The declarative half: watch Sandbox records and converge each one.

Records written by anything (the Fast-Path, `fsb apply`, kubectl on Kubernetes) arrive here as
watch events. Keys are queued once (a burst of events for one sandbox is one pass), worked by a
few workers, and retried with capped backoff when an agent could not confirm.
"""

from __future__ import annotations

import asyncio
import logging

from fastsandbox.api.models import Sandbox
from fastsandbox.control.lifecycle import SandboxLifecycle
from fastsandbox.control.sandboxes import Key
from fastsandbox.errors import Conflict, FsbError, Unavailable
from fastsandbox.store.base import EventType

log = logging.getLogger(__name__)


class SandboxReconciler:
    def __init__(self, lifecycle: SandboxLifecycle, *, workers: int = 4) -> None:
        self.lifecycle = lifecycle
        self.workers = workers
        self._queue: asyncio.Queue[Key] = asyncio.Queue()
        self._queued: set[Key] = set()
        self._backoff: dict[Key, float] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    def enqueue(self, key: Key) -> None:
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def _later(self, key: Key, delay: float) -> None:
        """Look at `key` again in `delay` seconds; an earlier look already planned wins, a later
        one is replaced (a shortened expireTime must fire on time)."""
        loop = asyncio.get_running_loop()
        planned = self._timers.get(key)
        if planned is not None:
            if planned.when() <= loop.time() + delay:
                return
            planned.cancel()

        def fire() -> None:
            self._timers.pop(key, None)
            self.enqueue(key)

        self._timers[key] = loop.call_later(delay, fire)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for i in range(self.workers):
                group.create_task(self._work(), name=f"sandbox-worker-{i}")
            group.create_task(self._watch(), name="sandbox-watch")

    async def _watch(self) -> None:
        store = self.lifecycle.store
        outage = 0.0
        while True:
            try:
                since = await store.current_resource_version()
                for sb in await store.list(Sandbox):
                    self.enqueue((sb.metadata.namespace, sb.metadata.name))
                outage = 0.0
                async for event in store.watch(Sandbox, since):
                    if event.type is EventType.BOOKMARK or event.object is None:
                        continue
                    meta = event.object.metadata
                    if event.type is EventType.DELETED:
                        continue
                    self.enqueue((meta.namespace, meta.name))
            except Conflict:
                log.info("watch history expired; listing again")
            except Unavailable as exc:
                # A remote store (the Kubernetes API server) can be away for a while; the loop
                # must outlive that instead of ending the plane's task group.
                outage = min(max(outage * 2, 0.5), 10.0)
                log.warning(
                    "object store unavailable; listing again",
                    extra={"err": exc.message, "retry_in": outage},
                )
                await asyncio.sleep(outage)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            try:
                again = await self.lifecycle.converge(key)
            except FsbError as exc:
                delay = min(self._backoff.get(key, 0.25) * 2, 30.0)
                self._backoff[key] = delay
                log.warning(
                    "reconcile failed; retrying",
                    extra={"sandbox": f"{key[0]}/{key[1]}", "err": str(exc), "retry_in": delay},
                )
                self._later(key, delay)
                continue
            except Exception:
                log.exception("reconcile crashed", extra={"sandbox": f"{key[0]}/{key[1]}"})
                self._later(key, 5.0)
                continue
            self._backoff.pop(key, None)
            if again is not None:
                self._later(key, again)
