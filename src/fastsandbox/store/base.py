"""The `ObjectStore` seam and the semantics every backend must keep.

Semantics (tests/contract/test_store_contract.py checks them on every backend):

- Objects are `Sandbox` or `SandboxPool` models, keyed by (kind, namespace, name).
- `create` assigns `metadata.uid` (unless given), `creationTimestamp`, `generation=1` and a new
  `resourceVersion`; an existing key raises `AlreadyExists`.
- `resourceVersion` is a store-wide, strictly increasing integer rendered as a string.
- `update` replaces metadata (labels, annotations, finalizers) and spec. When the given object's
  `resourceVersion` is not empty and differs from the stored one it raises `Conflict`.
  `generation` increases when the spec changes. Status in the given object is ignored.
- `update_status` replaces only status, with the same concurrency rule; generation unchanged.
- A write that changes nothing returns the stored object as is: no new resourceVersion and no
  event, so a reconciler writing back what it read does not wake itself up.
- `delete` on an object with finalizers sets `deletionTimestamp` (once) and returns the object;
  without finalizers it removes it and returns None. An `update` that empties the finalizers of an
  object with `deletionTimestamp` removes it (emitting DELETED).
- `watch(kind, since)` yields every change with resourceVersion > since in order (ADDED,
  MODIFIED, DELETED), then live changes; a BOOKMARK event carries the current resourceVersion
  when nothing else happens for a while, so a watcher can resume cheaply. `since` older than
  the retained history (or newer than the store's) raises `Conflict` (the watcher must list
  again).
  Closing the store ends every watch with `Unavailable`.
- Missing objects raise `NotFound`.

Events (`fastsandbox.api.models.Event`; tests/contract/test_store_events_contract.py) are a
side record for diagnostics, not objects: no resourceVersion, no watch, best effort.

- `record_event` keeps an event of an object that exists (and, when the event names a uid, is
  that uid); an event of a missing object or of an earlier one with the same name is dropped,
  never an error. When it repeats the object's latest event (same type, reason and message)
  that one is updated instead (count grows by the event's count, timestamp becomes the
  event's), so a retry loop cannot push every other event out.
- `list_events` returns the object's most recent `limit` events, oldest first; none (not
  `NotFound`) for an object without any.
- A backend keeps about the last `MAX_EVENTS_PER_OBJECT` events of each object and drops them
  all when the object is removed.
- A backend may also create several objects at once (`BatchCreates.create_many`: each as by
  `create`, in order, with its own outcome, in one write): a burst of Fast creates stores one
  record each right after answering, and one write each was one hand-off to the database's
  thread each.
- A backend may also take several events at once (`EventBatches.record_events`: as many
  `record_event`s in order, in one write): a burst of creates records two events each, and one
  write per event was one hand-off to the database's thread per event.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeVar, runtime_checkable

from fastsandbox.api.models import Event, Sandbox, SandboxPool
from fastsandbox.errors import FsbError

# Events kept per object; older ones are dropped first.
MAX_EVENTS_PER_OBJECT = 100
# `list_events`' default `limit`.
DEFAULT_EVENT_LIMIT = 50

Obj = TypeVar("Obj", Sandbox, SandboxPool)


class EventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    # None only for BOOKMARK.
    object: Sandbox | SandboxPool | None
    resource_version: str


class ObjectStore(Protocol):
    keeps_uid: bool
    """Whether `create` keeps the `metadata.uid` it is given (SQLite, memory) or assigns its own
    (the apiserver): a record answered before it is stored can only promise a uid it keeps."""

    async def get(self, kind: type[Obj], namespace: str, name: str) -> Obj: ...

    async def list(
        self,
        kind: type[Obj],
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Obj]:
        """Objects of `kind`, in one namespace or all (None), whose labels include `labels`."""
        ...

    async def create(self, obj: Obj) -> Obj: ...

    async def update(self, obj: Obj) -> Obj: ...

    async def update_status(self, obj: Obj) -> Obj: ...

    async def delete(self, kind: type[Obj], namespace: str, name: str) -> Obj | None: ...

    def watch(
        self, kind: type[Sandbox] | type[SandboxPool], since: str = "0"
    ) -> AsyncGenerator[WatchEvent, None]:
        """An async generator, so a watcher that stops early can `aclose()` it (or use
        `contextlib.aclosing`) and unsubscribe at once instead of at garbage collection."""
        ...

    async def current_resource_version(self) -> str: ...

    async def record_event(self, event: Event) -> None:
        """Keep `event` (or merge it into the object's latest, see above). Never raises
        because the object is gone; raises `Unavailable` when the store itself fails."""
        ...

    async def list_events(
        self, kind: str, namespace: str, name: str, limit: int = DEFAULT_EVENT_LIMIT
    ) -> builtins.list[Event]:
        """The object's most recent `limit` events, oldest first."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class EventBatches(Protocol):
    """A store that writes several events as one write (SQLite: one transaction)."""

    async def record_events(self, events: Sequence[Event]) -> None:
        """`record_event` of each, in order, as one write; raises `Unavailable` when the store
        fails (then none of them is kept)."""
        ...


@runtime_checkable
class BatchCreates(Protocol):
    """A store that creates several objects as one write (SQLite: one transaction)."""

    async def create_many(self, objs: Sequence[Obj]) -> list[Obj | FsbError]:
        """`create` of each, in order, as one write: the stored object of each, or the error
        its own `create` would have raised (`AlreadyExists`); raises `Unavailable` when the
        store fails (then none of them is stored)."""
        ...
