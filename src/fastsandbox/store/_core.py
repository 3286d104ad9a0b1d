"""The `ObjectStore` flow written once; backends supply a few storage primitives.

Why a shared core: read-modify-write under one lock, resourceVersion assignment, no-op detection,
finalizer handling and the watch protocol (replay, then live, then bookmarks) are the subtle
parts, and they must behave the same on the in-memory fake and on SQLite. A backend only says
how to fetch bodies, apply one `Write` atomically, and read back retained history; for object
events, how to keep one (deciding with `event_applies` and `merge_event`) and read them back.

Writes are serialised by one `asyncio.Lock`: the next resourceVersion is known before the write
starts, and events are published in commit order. Reads do not take the lock.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass

from fastsandbox._aio.to_the_end import to_the_end
from fastsandbox.api.models import KINDS, Event, Sandbox, SandboxPool
from fastsandbox.errors import (
    AlreadyExists,
    Conflict,
    FsbError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from fastsandbox.store import _rules as rules
from fastsandbox.store._watch import Hub, Record
from fastsandbox.store.base import DEFAULT_EVENT_LIMIT, EventType, Obj, WatchEvent


@dataclass(frozen=True, slots=True)
class Write:
    """One atomic change: the object row and its event, at `resource_version`."""

    kind: str
    namespace: str
    name: str
    uid: str
    resource_version: int
    previous: int | None
    """The stored resourceVersion this change is based on; None for a create."""
    event: EventType
    """ADDED inserts, MODIFIED replaces, DELETED removes the row."""
    body: str
    """The object after the change (for DELETED: its last state); also the event's body."""


class StoreCore(abc.ABC):
    keeps_uid = True

    def __init__(self, *, resource_version: int, history: int, bookmark_interval: float) -> None:
        if history < 1:
            raise InvalidArgument("the store must keep at least one event of history")
        if bookmark_interval <= 0:
            raise InvalidArgument("bookmark_interval must be positive")
        self._rv = resource_version
        self._history_size = history
        self._bookmark_interval = bookmark_interval
        self._hub = Hub(resource_version, limit=history)
        self._write_lock = asyncio.Lock()
        self._closed = False

    # -- backend primitives ----------------------------------------------------------------
    @abc.abstractmethod
    async def _fetch(self, kind: str, namespace: str, name: str) -> str | None: ...

    @abc.abstractmethod
    async def _fetch_all(self, kind: str, namespace: str | None) -> list[str]:
        """Bodies ordered by (namespace, name)."""

    @abc.abstractmethod
    async def _apply(self, write: Write) -> None:
        """Store `write` atomically or not at all; a changed `previous` raises `Conflict`,
        an existing key on ADDED raises `AlreadyExists`."""

    @abc.abstractmethod
    async def _replay(self, kind: str, since: int) -> tuple[list[Record], int]:
        """Retained events of `kind` after `since` in order, and the newest trimmed-away
        resourceVersion (read after the events, so a concurrent trim cannot hide a gap)."""

    @abc.abstractmethod
    async def _keep_event(self, event: Event) -> None:
        """Store `event` atomically, or merge it into the object's latest (`merge_event`),
        or drop it when `event_applies` says it is not the stored object's; then trim the
        object's events to `MAX_EVENTS_PER_OBJECT`."""

    @abc.abstractmethod
    async def _fetch_events(self, kind: str, namespace: str, name: str, limit: int) -> list[str]:
        """Bodies of the object's `limit` most recent events, oldest first."""

    @abc.abstractmethod
    async def _shutdown(self) -> None: ...

    # -- reads -----------------------------------------------------------------------------
    async def get(self, kind: type[Obj], namespace: str, name: str) -> Obj:
        self._check_open()
        kname = rules.kind_name(kind)
        body = await self._fetch(kname, namespace, name)
        if body is None:
            raise NotFound(f"{rules.describe(kname, namespace, name)} not found")
        return rules.decode(kind, body)

    async def list(
        self,
        kind: type[Obj],
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[Obj]:
        self._check_open()
        bodies = await self._fetch_all(rules.kind_name(kind), namespace)
        objects = [rules.decode(kind, body) for body in bodies]
        return [obj for obj in objects if rules.labels_match(obj, labels)]

    async def current_resource_version(self) -> str:
        self._check_open()
        return str(self._rv)

    # -- events ----------------------------------------------------------------------------
    async def record_event(self, event: Event) -> None:
        check_event_kind(event.kind)
        # Under the write lock: the backend's writer runs one transaction at a time.
        async with self._write_lock:
            self._check_open()
            await to_the_end(self._keep_event(event))

    async def record_events(self, events: Sequence[Event]) -> None:
        """`record_event` of each (in order) as one write (`store.base.EventBatches`)."""
        for event in events:
            check_event_kind(event.kind)
        async with self._write_lock:
            self._check_open()
            await to_the_end(self._keep_events(events))

    async def _keep_events(self, events: Sequence[Event]) -> None:
        """Keep each of `events` in order; a backend with transactions does it in one."""
        for event in events:
            await self._keep_event(event)

    async def list_events(
        self, kind: str, namespace: str, name: str, limit: int = DEFAULT_EVENT_LIMIT
    ) -> builtins.list[Event]:
        self._check_open()
        check_event_kind(kind)
        if limit < 1:
            raise InvalidArgument(f"limit must be at least 1, not {limit}")
        bodies = await self._fetch_events(kind, namespace, name, limit)
        return [Event.model_validate_json(body) for body in bodies]

    # -- writes ----------------------------------------------------------------------------
    async def create(self, obj: Obj) -> Obj:
        kname = rules.kind_name(type(obj))
        async with self._write_lock:
            self._check_open()
            fresh = rules.for_create(obj, self._rv + 1)
            meta = fresh.metadata
            await self._commit(
                Write(
                    kind=kname,
                    namespace=meta.namespace,
                    name=meta.name,
                    uid=meta.uid,
                    resource_version=self._rv + 1,
                    previous=None,
                    event=EventType.ADDED,
                    body=rules.encode(fresh),
                )
            )
            return fresh

    async def create_many(self, objs: Sequence[Obj]) -> builtins.list[Obj | FsbError]:
        """Each of `objs` as by `create`, in order (`store.base.BatchCreates`): one `create`
        each here, one transaction for all in SQLite (`SqliteStore.create_many`)."""
        outcomes: builtins.list[Obj | FsbError] = []
        for obj in objs:
            try:
                outcomes.append(await self.create(obj))
            except AlreadyExists as exc:
                outcomes.append(exc)
        return outcomes

    async def _create_writes(
        self, objs: Sequence[Obj]
    ) -> tuple[builtins.list[Obj | FsbError], builtins.list[Write]]:
        """For a backend's one-write `create_many`, under the write lock: each object's
        stored form (or AlreadyExists) and the writes for those that are new. Nothing else
        writes meanwhile, so a name checked free here cannot be taken before the commit."""
        outcomes: builtins.list[Obj | FsbError] = []
        writes: builtins.list[Write] = []
        taken: set[tuple[str, str, str]] = set()
        rv = self._rv
        for obj in objs:
            kname = rules.kind_name(type(obj))
            key = (kname, obj.metadata.namespace, obj.metadata.name)
            if key in taken or await self._fetch(*key) is not None:
                outcomes.append(
                    AlreadyExists(f"{rules.describe(*key)} already exists: pick another name")
                )
                continue
            taken.add(key)
            rv += 1
            fresh = rules.for_create(obj, rv)
            outcomes.append(fresh)
            writes.append(
                Write(
                    kind=kname,
                    namespace=key[1],
                    name=key[2],
                    uid=fresh.metadata.uid,
                    resource_version=rv,
                    previous=None,
                    event=EventType.ADDED,
                    body=rules.encode(fresh),
                )
            )
        return outcomes, writes

    async def update(self, obj: Obj) -> Obj:
        async with self._write_lock:
            current = await self._load_for_write(type(obj), obj)
            new = rules.for_update(current, obj)
            if new is None:
                return current
            return await self._replace(current, new, remove=rules.is_gone(new))

    async def update_status(self, obj: Obj) -> Obj:
        async with self._write_lock:
            current = await self._load_for_write(type(obj), obj)
            new = rules.for_status(current, obj)
            if new is None:
                return current
            return await self._replace(current, new, remove=False)

    async def delete(self, kind: type[Obj], namespace: str, name: str) -> Obj | None:
        async with self._write_lock:
            self._check_open()
            current = await self.get(kind, namespace, name)
            if current.metadata.finalizers:
                marked = rules.for_delete(current)
                if marked is None:
                    return current
                return await self._replace(current, marked, remove=False)
            await self._replace(current, current.model_copy(deep=True), remove=True)
            return None

    async def _load_for_write(self, kind: type[Obj], given: Obj) -> Obj:
        self._check_open()
        return await self.get(kind, given.metadata.namespace, given.metadata.name)

    async def _replace(self, current: Obj, new: Obj, *, remove: bool) -> Obj:
        rv = self._rv + 1
        new.metadata.resource_version = str(rv)
        meta = new.metadata
        await self._commit(
            Write(
                kind=rules.kind_name(type(new)),
                namespace=meta.namespace,
                name=meta.name,
                uid=meta.uid,
                resource_version=rv,
                previous=int(current.metadata.resource_version),
                event=EventType.DELETED if remove else EventType.MODIFIED,
                body=rules.encode(new),
            )
        )
        return new

    async def _commit(self, write: Write) -> None:
        await to_the_end(self._commit_now(write))

    async def _commit_now(self, write: Write) -> None:
        await self._apply(write)
        self._published(write)

    def _published(self, write: Write) -> None:
        self._rv = write.resource_version
        self._hub.publish(Record(write.resource_version, write.kind, write.event, write.body))

    # -- watch -----------------------------------------------------------------------------
    async def watch(
        self, kind: type[Sandbox] | type[SandboxPool], since: str = "0"
    ) -> AsyncGenerator[WatchEvent, None]:
        self._check_open()
        start = rules.parse_resource_version(since)
        kname = rules.kind_name(kind)
        # Subscribe before reading history: a change committed meanwhile lands in both, and
        # the resourceVersion check below drops the duplicate instead of losing it.
        sub = self._hub.subscribe(kname)
        try:
            if start > self._hub.last_resource_version:
                raise Conflict(
                    f"resourceVersion {start} is newer than the store's "
                    f"({self._hub.last_resource_version}): list again and watch from there"
                )
            records, trimmed = await self._replay(kname, start)
            if start < trimmed:
                raise Conflict(
                    f"resourceVersion {start} is older than the retained history (which starts "
                    f"after {trimmed}): list again and watch from the list's resourceVersion"
                )
            last = start
            for old in records:
                if old.resource_version > last:
                    last = old.resource_version
                    yield _event(kind, old)
            while True:
                record = await sub.next(self._bookmark_interval)
                if record is None:
                    # Nothing pending: every change up to the hub's last one has been seen.
                    last = max(last, self._hub.last_resource_version)
                    yield WatchEvent(EventType.BOOKMARK, None, str(last))
                elif record.resource_version > last:
                    last = record.resource_version
                    yield _event(kind, record)
        finally:
            self._hub.unsubscribe(sub)

    # -- lifecycle -------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.close()
        async with self._write_lock:  # an in-flight write finishes first
            await self._shutdown()

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the object store is closed")


# -- event rules (pure; every backend applies them the same way) ------------------------------
def check_event_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidArgument(f"events are kept for {' and '.join(KINDS)}, not {kind!r}")


def event_applies(event: Event, stored_uid: str | None) -> bool:
    """Whether `event` belongs to the stored object (uid None: there is none). An event that
    names no uid belongs to whatever object has its name."""
    return stored_uid is not None and (not event.uid or event.uid == stored_uid)


def merge_event(latest: Event | None, event: Event) -> Event | None:
    """`latest` updated by a repeat of itself, or None when `event` is a new one."""
    if latest is None or (latest.type, latest.reason, latest.message) != (
        event.type,
        event.reason,
        event.message,
    ):
        return None
    return latest.model_copy(
        update={"count": latest.count + event.count, "timestamp": event.timestamp}
    )


def encode_event(event: Event) -> str:
    return event.model_dump_json(by_alias=True)


def _event(kind: type[Sandbox] | type[SandboxPool], record: Record) -> WatchEvent:
    obj: Sandbox | SandboxPool = kind.model_validate_json(record.body)
    return WatchEvent(record.type, obj, str(record.resource_version))
