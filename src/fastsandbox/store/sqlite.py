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
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import aiosqlite

from fastsandbox.api.models import Event
from fastsandbox.errors import AlreadyExists, Conflict, Unavailable
from fastsandbox.store import _rules as rules
from fastsandbox.store._core import StoreCore, Write, encode_event, event_applies, merge_event
from fastsandbox.store._watch import Record
from fastsandbox.store.base import MAX_EVENTS_PER_OBJECT, EventType
from fastsandbox.store.faults import WriteDelay

log = logging.getLogger(__name__)

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
        )

    # -- primitives ------------------------------------------------------------------------
    async def _fetch(self, kind: str, namespace: str, name: str) -> str | None:
        rows = await self._rows(
            self._reader,
            "SELECT body FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
            (kind, namespace, name),
        )
        return str(rows[0][0]) if rows else None

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
        rv = write.resource_version
        overdue = rv - self._trimmed > self._history_size + self._trim_batch
        trim_to = rv - self._history_size if overdue else None
        if self._write_delay is not None:
            await self._write_delay.before_write()
        await self._exec("BEGIN IMMEDIATE")
        try:
            await self._bump_counter(rv, trim_to)
            what = rules.describe(write.kind, write.namespace, write.name)
            if write.event is EventType.ADDED:
                changed = await self._exec(
                    "INSERT INTO objects (kind, namespace, name, uid, resource_version, body)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (write.kind, write.namespace, write.name, write.uid, rv, write.body),
                )
                if changed != 1:
                    raise AlreadyExists(f"{what} already exists: pick another name")
            else:
                key = (write.kind, write.namespace, write.name, write.previous)
                if write.event is EventType.DELETED:
                    changed = await self._exec(
                        "DELETE FROM objects WHERE kind = ? AND namespace = ? AND name = ?"
                        " AND resource_version = ?",
                        key,
                    )
                    await self._exec(
                        "DELETE FROM object_events WHERE kind = ? AND namespace = ? AND name = ?",
                        key[:3],
                    )
                else:
                    changed = await self._exec(
                        "UPDATE objects SET uid = ?, resource_version = ?, body = ?"
                        " WHERE kind = ? AND namespace = ? AND name = ? AND resource_version = ?",
                        (write.uid, rv, write.body, *key),
                    )
                if changed != 1:
                    raise Conflict(f"{what} was modified meanwhile: read it again and retry")
            await self._exec(
                "INSERT INTO events (resource_version, kind, type, body) VALUES (?, ?, ?, ?)",
                (rv, write.kind, write.event.value, write.body),
            )
            if trim_to is not None:
                await self._exec("DELETE FROM events WHERE resource_version <= ?", (trim_to,))
            await self._exec("COMMIT")
        except BaseException:
            await self._rollback()
            raise
        if trim_to is not None:
            self._trimmed = trim_to

    async def _keep_event(self, event: Event) -> None:
        key = (event.kind, event.namespace, event.name)
        if self._write_delay is not None:
            await self._write_delay.before_write()
        await self._exec("BEGIN IMMEDIATE")
        try:
            rows = await self._rows(
                self._writer,
                "SELECT uid FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
                key,
            )
            if event_applies(event, str(rows[0][0]) if rows else None):
                await self._insert_or_merge(key, event)
            await self._exec("COMMIT")
        except BaseException:
            await self._rollback()
            raise

    async def _insert_or_merge(self, key: tuple[str, str, str], event: Event) -> None:
        latest = await self._rows(
            self._writer,
            "SELECT id, body FROM object_events WHERE kind = ? AND namespace = ? AND name = ?"
            " ORDER BY id DESC LIMIT 1",
            key,
        )
        merged = merge_event(Event.model_validate_json(latest[0][1]) if latest else None, event)
        if merged is not None:
            await self._exec(
                "UPDATE object_events SET body = ? WHERE id = ?",
                (encode_event(merged), latest[0][0]),
            )
            return
        await self._exec(
            "INSERT INTO object_events (kind, namespace, name, body) VALUES (?, ?, ?, ?)",
            (*key, encode_event(event)),
        )
        await self._exec(
            "DELETE FROM object_events WHERE kind = ? AND namespace = ? AND name = ? AND id <= ("
            " SELECT id FROM object_events WHERE kind = ? AND namespace = ? AND name = ?"
            " ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (*key, *key, MAX_EVENTS_PER_OBJECT),
        )

    async def _fetch_events(self, kind: str, namespace: str, name: str, limit: int) -> list[str]:
        rows = await self._rows(
            self._reader,
            "SELECT body FROM (SELECT id, body FROM object_events"
            " WHERE kind = ? AND namespace = ? AND name = ? ORDER BY id DESC LIMIT ?)"
            " ORDER BY id",
            (kind, namespace, name, limit),
        )
        return [str(row[0]) for row in rows]

    async def _bump_counter(self, rv: int, trim_to: int | None) -> None:
        if trim_to is None:
            bumped = await self._exec(
                "UPDATE meta SET resource_version = ? WHERE id = 0 AND resource_version = ?",
                (rv, rv - 1),
            )
        else:
            bumped = await self._exec(
                "UPDATE meta SET resource_version = ?, trimmed_resource_version = ?"
                " WHERE id = 0 AND resource_version = ?",
                (rv, trim_to, rv - 1),
            )
        if bumped != 1:
            raise Unavailable(
                f"the state database {self.path} was written by another process: only one "
                "fsb server may use a data dir; stop the other one and restart this one"
            )

    async def _rollback(self) -> None:
        if not self._writer.in_transaction:
            return
        try:
            await self._writer.rollback()
        except (sqlite3.Error, ValueError):
            log.exception("rollback failed", extra={"path": str(self.path)})

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

    async def _exec(self, sql: str, params: Iterable[Any] = ()) -> int:
        """Run one statement on the writer; the number of rows it changed."""
        with _translated(self.path):
            cursor = await self._writer.execute(sql, tuple(params))
            return int(cursor.rowcount)


async def _scalar(conn: aiosqlite.Connection, sql: str) -> Any:
    rows = list(await conn.execute_fetchall(sql))
    return rows[0][0] if rows else None
