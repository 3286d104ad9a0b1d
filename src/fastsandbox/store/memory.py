"""`MemoryStore`: the in-process fake of `ObjectStore` for unit tests.

Why it keeps JSON text rather than model instances: nothing a caller does to an object it got
(or gave) can then reach the stored state, exactly as with a real backend, and the same
serialization path is exercised. Semantics come from the shared core; this module only says
where the bytes live. History is a bounded deque; a watcher asking for older changes gets
`Conflict`, as on SQLite.
"""

from __future__ import annotations

import json
from collections import deque

from fastsandbox.api.models import Event
from fastsandbox.errors import AlreadyExists, Conflict
from fastsandbox.store import _rules as rules
from fastsandbox.store._core import StoreCore, Write, encode_event, event_applies, merge_event
from fastsandbox.store._watch import Record
from fastsandbox.store.base import MAX_EVENTS_PER_OBJECT, EventType

_Key = tuple[str, str, str]


class MemoryStore(StoreCore):
    def __init__(self, *, history: int = 1000, bookmark_interval: float = 10.0) -> None:
        """`history`: events kept for watchers resuming from an older resourceVersion.
        `bookmark_interval`: idle seconds before a watcher gets a BOOKMARK (small in tests)."""
        super().__init__(resource_version=0, history=history, bookmark_interval=bookmark_interval)
        self._objects: dict[_Key, tuple[int, str]] = {}
        self._events: deque[Record] = deque(maxlen=history)
        self._trimmed = 0
        # Object events by object key, oldest first; JSON text like everything else here.
        self._object_events: dict[_Key, deque[str]] = {}

    async def _fetch(self, kind: str, namespace: str, name: str) -> str | None:
        row = self._objects.get((kind, namespace, name))
        return row[1] if row else None

    async def _fetch_all(self, kind: str, namespace: str | None) -> list[str]:
        return [
            body
            for (k, ns, _), (_, body) in sorted(self._objects.items())
            if k == kind and (namespace is None or ns == namespace)
        ]

    async def _apply(self, write: Write) -> None:
        key = (write.kind, write.namespace, write.name)
        row = self._objects.get(key)
        what = rules.describe(write.kind, write.namespace, write.name)
        if write.previous is None:
            if row is not None:
                raise AlreadyExists(f"{what} already exists: pick another name")
        elif row is None or row[0] != write.previous:
            raise Conflict(f"{what} was modified meanwhile: read it again and retry")
        if write.event is EventType.DELETED:
            del self._objects[key]
            self._object_events.pop(key, None)
        else:
            self._objects[key] = (write.resource_version, write.body)
        if len(self._events) == self._events.maxlen:
            self._trimmed = self._events[0].resource_version
        self._events.append(Record(write.resource_version, write.kind, write.event, write.body))

    async def _replay(self, kind: str, since: int) -> tuple[list[Record], int]:
        records = [r for r in self._events if r.kind == kind and r.resource_version > since]
        return records, self._trimmed

    async def _keep_event(self, event: Event) -> None:
        key = (event.kind, event.namespace, event.name)
        row = self._objects.get(key)
        uid = str(json.loads(row[1])["metadata"].get("uid", "")) if row else None
        if not event_applies(event, uid):
            return
        kept = self._object_events.setdefault(key, deque(maxlen=MAX_EVENTS_PER_OBJECT))
        merged = merge_event(Event.model_validate_json(kept[-1]) if kept else None, event)
        if merged is not None:
            kept[-1] = encode_event(merged)
        else:
            kept.append(encode_event(event))

    async def _fetch_events(self, kind: str, namespace: str, name: str, limit: int) -> list[str]:
        kept = self._object_events.get((kind, namespace, name), ())
        return list(kept)[-limit:]

    async def _shutdown(self) -> None:
        self._objects.clear()
        self._events.clear()
        self._object_events.clear()
