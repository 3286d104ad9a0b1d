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
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeVar

from fastsandbox.api.models import Sandbox, SandboxPool

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

    async def close(self) -> None: ...
