"""`SqliteStore`: the embedded default `ObjectStore`, one SQLite file in WAL mode.

Why SQLite: one machine needs no cluster, and a single file under the data dir
is trivially backed up and inspected (`sqlite3 state.db 'select * from objects'`).

Layout: `objects` holds one row per object (its JSON body plus the key and resourceVersion
as columns, so lookups and the optimistic-concurrency check run on indexed columns); `events`
holds the last `history` changes for watchers resuming from an older resourceVersion; `meta`
is one row with the store-wide resourceVersion counter, bumped in the same transaction as the
change it numbers. `object_events` holds each object's recent `Event`s (for `fsb describe`),
removed in the same transaction as their object; they take no resourceVersion.

One server process owns the file. Watchers replay history from `events`, then receive live
changes in-process from the writer (`_watch.Hub`) — nothing polls the database, so another
process writing to the file would not be seen; it is detected (the counter moved) and refused.

Two connections, each with its own aiosqlite thread: the writer runs one transaction at a time
(the core's lock; SQLite has one writer anyway), the reader serves get/list/replay without
waiting behind writes and, in autocommit mode, sees every committed change. sqlite3 errors are
translated into `fastsandbox.errors` here and nowhere else.

Recently read or written bodies are also kept in memory (`_bodies`, at most `BODY_CACHE`),
so a `get` — two per create, one per exec to find the sandbox's agent — is answered without a
hop to the reader's thread. That is coherent because every change passes through this process:
a commit replaces (or drops) the entry as soon as it is committed, and a read from the file
fills it only when no commit happened while it was reading. The keys of every stored object are
kept in memory too (`_keys`, read once at open, changed by each commit), so a `get` of a name
nobody holds — every create's name-free check — is answered NotFound without reading the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from fastsandbox._aio.to_the_end import to_the_end
from fastsandbox.api.models import Event
from fastsandbox.errors import AlreadyExists, Conflict, FsbError, Unavailable
from fastsandbox.store import _rules as rules
from fastsandbox.store._core import StoreCore, Write, encode_event, event_applies, merge_event
from fastsandbox.store._watch import Record
from fastsandbox.store.base import MAX_EVENTS_PER_OBJECT, EventType, Obj
from fastsandbox.store.faults import WriteDelay

log = logging.getLogger(__name__)

# Bodies kept in memory for `get` (oldest dropped first): recent objects' bodies are a few KiB.
BODY_CACHE = 4096

# 2: object_events (a version-1 file gets the table on open).
SCHEMA_VERSION = 2

_SCHEMA = """
BEGIN;
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    resource_version INTEGER NOT NULL,
    trimmed_resource_version INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (id, resource_version, trimmed_resource_version) VALUES (0, 0, 0);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    resource_version INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    resource_version INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_kind ON events (kind, resource_version);
CREATE TABLE IF NOT EXISTS object_events (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS object_events_by_object ON object_events (kind, namespace, name, id);
PRAGMA user_version = 2;
COMMIT;
"""


def _disk_cause(path: Path) -> str:
    """Why the disk under `path` refuses writes, when it says (SQLite reports a read-only or
    full file system as a bare "disk I/O error"): named, so the operator knows what to fix."""
    directory = path.parent
    resume = "writes resume by themselves"
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY or not os.access(directory, os.W_OK):
            return f"; {directory} is read-only or not writable by fsb (make it writable: {resume})"
        if shutil.disk_usage(directory).free == 0:
            return f"; no space left on the file system of {directory} (free some: {resume})"
    except OSError as exc:
        return f"; {directory}: {exc.strerror or exc}"
    return ""


@contextlib.contextmanager
def _translated(path: Path) -> Iterator[None]:
    """The one seam where sqlite3 (and aiosqlite) errors become our error tree."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "locked" in text or "busy" in text:
            raise Unavailable(
                f"the state database {path} is locked by another process: "
                "is a second fsb server using the same --data-dir?"
            ) from exc
        raise Unavailable(f"the state database {path} failed: {text}{_disk_cause(path)}") from exc
    except sqlite3.Error as exc:
        raise Unavailable(
            f"the state database {path} failed: {exc} (check the disk and the file)"
        ) from exc
    except ValueError as exc:  # aiosqlite: "Connection closed" / "no active connection"
        raise Unavailable("the object store is closed") from exc


class SqliteStore(StoreCore):
    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        *,
        resource_version: int,
        trimmed: int,
        history: int,
        bookmark_interval: float,
        write_delay: WriteDelay | None = None,
        keys: set[tuple[str, str, str]] | None = None,
    ) -> None:
        """Use `SqliteStore.open`."""
        super().__init__(
            resource_version=resource_version, history=history, bookmark_interval=bookmark_interval
        )
        self.path = path
        self._writer = writer
        self._reader = reader
        self._trimmed = trimmed
        # Trim in batches: one DELETE per `_trim_batch` writes instead of one per write.
        self._trim_batch = max(1, history // 10)
        # (kind, namespace, name) -> body, or None for "not stored" (a get of a free name).
        self._bodies: dict[tuple[str, str, str], str | None] = {}
        # (kind, namespace, name) of every stored object; None: unknown (read the file).
        self._keys = keys
        self._write_delay = write_delay

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        history: int = 10_000,
        bookmark_interval: float = 10.0,
        write_delay: WriteDelay | None = None,
    ) -> SqliteStore:
        """Open (creating if needed) the store at `path`.

        `history`: at least this many recent events are kept for watchers resuming from an
        older resourceVersion. `bookmark_interval`: idle seconds before a watcher gets a
        BOOKMARK. `write_delay`: the fault suite's slow disk (`store/faults.py`); None in
        production.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _translated(path):
            writer = await aiosqlite.connect(path, isolation_level=None)
        reader: aiosqlite.Connection | None = None
        try:
            with _translated(path):
                mode = await _scalar(writer, "PRAGMA journal_mode = WAL")
                if str(mode).lower() != "wal":
                    log.warning("SQLite refused WAL mode", extra={"path": str(path), "mode": mode})
                # WAL + synchronous=NORMAL: a commit is appended to the WAL before COMMIT
                # returns, but fsync'd only at checkpoints. A killed *process* (kill -9, crash)
                # loses nothing acknowledged: the bytes are in the OS page cache and the next
                # open replays the WAL. Only an OS crash or power loss can drop the last few
                # commits, never corrupt the file. FULL would fsync every commit (milliseconds
                # each) to also survive power loss; the Fast path does not pay that, and
                # recovery reconciles records with what agents report anyway.
                await writer.execute("PRAGMA synchronous = NORMAL")
                await writer.execute("PRAGMA busy_timeout = 5000")
                version = int(await _scalar(writer, "PRAGMA user_version"))
                if version > SCHEMA_VERSION:
                    raise Unavailable(
                        f"the state database {path} has schema version {version}, newer than "
                        f"this fsb understands ({SCHEMA_VERSION}): upgrade fsb"
                    )
                await writer.executescript(_SCHEMA)
                rows = await writer.execute_fetchall(
                    "SELECT resource_version, trimmed_resource_version FROM meta WHERE id = 0"
                )
                resource_version, trimmed = next(iter(rows))
                stored = await writer.execute_fetchall("SELECT kind, namespace, name FROM objects")
                keys = {(str(k), str(ns), str(n)) for k, ns, n in stored}
                reader = await aiosqlite.connect(path, isolation_level=None)
                await reader.execute("PRAGMA busy_timeout = 5000")
                await reader.execute("PRAGMA query_only = ON")
        except BaseException:
            for conn in (writer, reader):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            raise
        log.debug(
            "opened object store", extra={"path": str(path), "resource_version": resource_version}
        )
        return cls(
            path,
            writer,
            reader,
            resource_version=int(resource_version),
            trimmed=int(trimmed),
            history=history,
            bookmark_interval=bookmark_interval,
            write_delay=write_delay,
            keys=keys,
        )

    # -- primitives ------------------------------------------------------------------------
    async def _fetch(self, kind: str, namespace: str, name: str) -> str | None:
        key = (kind, namespace, name)
        try:
            return self._bodies[key]
        except KeyError:
            pass
        if self._keys is not None and key not in self._keys:
            return None  # nothing by that name: no need to read the file
        before = self._rv
        rows = await self._rows(
            self._reader,
            "SELECT body FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
            key,
        )
        body = str(rows[0][0]) if rows else None
        if self._rv == before:
            # No commit while we read: what we read is still the stored state.
            self._remember(key, body)
        return body

    def _remember(self, key: tuple[str, str, str], body: str | None) -> None:
        bodies = self._bodies
        bodies.pop(key, None)
        if len(bodies) >= BODY_CACHE:
            del bodies[next(iter(bodies))]
        bodies[key] = body

    async def _fetch_all(self, kind: str, namespace: str | None) -> list[str]:
        if namespace is None:
            rows = await self._rows(
                self._reader,
                "SELECT body FROM objects WHERE kind = ? ORDER BY namespace, name",
                (kind,),
            )
        else:
            rows = await self._rows(
                self._reader,
                "SELECT body FROM objects WHERE kind = ? AND namespace = ? ORDER BY name",
                (kind, namespace),
            )
        return [str(row[0]) for row in rows]

    async def _replay(self, kind: str, since: int) -> tuple[list[Record], int]:
        rows = await self._rows(
            self._reader,
            "SELECT resource_version, type, body FROM events"
            " WHERE kind = ? AND resource_version > ? ORDER BY resource_version",
            (kind, since),
        )
        trimmed = await self._rows(
            self._reader, "SELECT trimmed_resource_version FROM meta WHERE id = 0"
        )
        records = [Record(int(rv), kind, EventType(type_), str(body)) for rv, type_, body in rows]
        return records, int(trimmed[0][0])

    async def _apply(self, write: Write) -> None:
        key = (write.kind, write.namespace, write.name)
        try:
            await self._apply_rows(write)
        except BaseException:
            self._bodies.pop(key, None)
            if self._keys is not None:
                # It may have been written after all: being in `_keys` only means "read the
                # file", which tells.
                self._keys.add(key)
            raise
        # No await from here to the core's counter bump: a read that began before this commit
        # sees the counter move and does not put back what it read.
        gone = write.event is EventType.DELETED
        self._remember(key, None if gone else write.body)
        if self._keys is not None:
            if gone:
                self._keys.discard(key)
            else:
                self._keys.add(key)

    async def create_many(self, objs: Sequence[Obj]) -> list[Obj | FsbError]:
        """Each as by `create`, in order, in one transaction (`store.base.BatchCreates`)."""
        async with self._write_lock:
            self._check_open()
            outcomes, writes = await self._create_writes(objs)
            if writes:
                await to_the_end(self._commit_many(writes))
        return outcomes

    async def _commit_many(self, writes: Sequence[Write]) -> None:
        """Every write in one transaction (one hand-off to the writer's thread), then each
        remembered and published in order, as `_apply` and the core do for one."""
        last = writes[-1].resource_version
        overdue = last - self._trimmed > self._history_size + self._trim_batch
        trim_to = last - self._history_size if overdue else None
        keys = [(w.kind, w.namespace, w.name) for w in writes]
        if self._write_delay is not None:
            await self._write_delay.before_write()
        try:
            await self._transaction(self._apply_many_sync, writes, trim_to)
        except BaseException:
            for key in keys:
                self._bodies.pop(key, None)
                if self._keys is not None:
                    self._keys.add(key)  # as in `_apply`: "read the file"
            raise
        if trim_to is not None:
            self._trimmed = trim_to
        for write, key in zip(writes, keys, strict=True):
            self._remember(key, write.body)
            if self._keys is not None:
                self._keys.add(key)
            self._published(write)

    def _apply_many_sync(
        self, conn: sqlite3.Connection, writes: Sequence[Write], trim_to: int | None
    ) -> None:
        for i, write in enumerate(writes):
            last = i == len(writes) - 1
            self._apply_sync(conn, write, write.resource_version, trim_to if last else None)

    async def _apply_rows(self, write: Write) -> None:
        rv = write.resource_version
        overdue = rv - self._trimmed > self._history_size + self._trim_batch
        trim_to = rv - self._history_size if overdue else None
        if self._write_delay is not None:
            await self._write_delay.before_write()
        await self._transaction(self._apply_sync, write, rv, trim_to)
        if trim_to is not None:
            self._trimmed = trim_to

    def _apply_sync(
        self, conn: sqlite3.Connection, write: Write, rv: int, trim_to: int | None
    ) -> None:
        self._bump_counter(conn, rv, trim_to)
        what = rules.describe(write.kind, write.namespace, write.name)
        if write.event is EventType.ADDED:
            changed = conn.execute(
                "INSERT INTO objects (kind, namespace, name, uid, resource_version, body)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (write.kind, write.namespace, write.name, write.uid, rv, write.body),
            ).rowcount
            if changed != 1:
                raise AlreadyExists(f"{what} already exists: pick another name")
        else:
            key = (write.kind, write.namespace, write.name, write.previous)
            if write.event is EventType.DELETED:
                changed = conn.execute(
                    "DELETE FROM objects WHERE kind = ? AND namespace = ? AND name = ?"
                    " AND resource_version = ?",
                    key,
                ).rowcount
                conn.execute(
                    "DELETE FROM object_events WHERE kind = ? AND namespace = ? AND name = ?",
                    key[:3],
                )
            else:
                changed = conn.execute(
                    "UPDATE objects SET uid = ?, resource_version = ?, body = ?"
                    " WHERE kind = ? AND namespace = ? AND name = ? AND resource_version = ?",
                    (write.uid, rv, write.body, *key),
                ).rowcount
            if changed != 1:
                raise Conflict(f"{what} was modified meanwhile: read it again and retry")
        conn.execute(
            "INSERT INTO events (resource_version, kind, type, body) VALUES (?, ?, ?, ?)",
            (rv, write.kind, write.event.value, write.body),
        )
        if trim_to is not None:
            conn.execute("DELETE FROM events WHERE resource_version <= ?", (trim_to,))

    async def _keep_event(self, event: Event) -> None:
        if self._write_delay is not None:
            await self._write_delay.before_write()
        await self._transaction(self._keep_event_sync, event)

    async def _keep_events(self, events: Sequence[Event]) -> None:
        if self._write_delay is not None:
            await self._write_delay.before_write()
        await self._transaction(self._keep_events_sync, events)

    def _keep_events_sync(self, conn: sqlite3.Connection, events: Sequence[Event]) -> None:
        for event in events:
            self._keep_event_sync(conn, event)

    def _keep_event_sync(self, conn: sqlite3.Connection, event: Event) -> None:
        key = (event.kind, event.namespace, event.name)
        rows = conn.execute(
            "SELECT uid FROM objects WHERE kind = ? AND namespace = ? AND name = ?", key
        ).fetchall()
        if not event_applies(event, str(rows[0][0]) if rows else None):
            return
        latest = conn.execute(
            "SELECT id, body FROM object_events WHERE kind = ? AND namespace = ? AND name = ?"
            " ORDER BY id DESC LIMIT 1",
            key,
        ).fetchall()
        merged = merge_event(Event.model_validate_json(latest[0][1]) if latest else None, event)
        if merged is not None:
            conn.execute(
                "UPDATE object_events SET body = ? WHERE id = ?",
                (encode_event(merged), latest[0][0]),
            )
            return
        conn.execute(
            "INSERT INTO object_events (kind, namespace, name, body) VALUES (?, ?, ?, ?)",
            (*key, encode_event(event)),
        )
        conn.execute(
            "DELETE FROM object_events WHERE kind = ? AND namespace = ? AND name = ? AND id <= ("
            " SELECT id FROM object_events WHERE kind = ? AND namespace = ? AND name = ?"
            " ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (*key, *key, MAX_EVENTS_PER_OBJECT),
        )

    async def _transaction(self, work: Callable[..., None], *args: Any) -> None:
        """Run `work(conn, *args)` inside BEGIN IMMEDIATE … COMMIT (ROLLBACK on any error) as
        one call into the writer's thread: a write's five to seven statements cost one hand-off
        between the event loop and that thread instead of one each (under a burst of creates
        those hand-offs were most of the server's CPU). aiosqlite has no public call for running
        a function in its thread; `_execute` is the one its own methods use."""

        def run() -> None:
            conn = self._writer._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                work(conn, *args)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.rollback()
                    except sqlite3.Error:
                        log.exception("rollback failed", extra={"path": str(self.path)})
                raise

        call: Callable[[Callable[[], None]], Awaitable[None]] = self._writer._execute
        with _translated(self.path):
            await call(run)

    async def _fetch_events(self, kind: str, namespace: str, name: str, limit: int) -> list[str]:
        rows = await self._rows(
            self._reader,
            "SELECT body FROM (SELECT id, body FROM object_events"
            " WHERE kind = ? AND namespace = ? AND name = ? ORDER BY id DESC LIMIT ?)"
            " ORDER BY id",
            (kind, namespace, name, limit),
        )
        return [str(row[0]) for row in rows]

    def _bump_counter(self, conn: sqlite3.Connection, rv: int, trim_to: int | None) -> None:
        if trim_to is None:
            bumped = conn.execute(
                "UPDATE meta SET resource_version = ? WHERE id = 0 AND resource_version = ?",
                (rv, rv - 1),
            ).rowcount
        else:
            bumped = conn.execute(
                "UPDATE meta SET resource_version = ?, trimmed_resource_version = ?"
                " WHERE id = 0 AND resource_version = ?",
                (rv, trim_to, rv - 1),
            ).rowcount
        if bumped != 1:
            raise Unavailable(
                f"the state database {self.path} was written by another process: only one "
                "fsb server may use a data dir; stop the other one and restart this one"
            )

    async def _shutdown(self) -> None:
        with _translated(self.path):
            await self._reader.close()
            await self._writer.close()

    # -- helpers ---------------------------------------------------------------------------
    async def _rows(
        self, conn: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()
    ) -> list[tuple[Any, ...]]:
        with _translated(self.path):
            return [tuple(row) for row in await conn.execute_fetchall(sql, tuple(params))]


async def _scalar(conn: aiosqlite.Connection, sql: str) -> Any:
    rows = list(await conn.execute_fetchall(sql))
    return rows[0][0] if rows else None
