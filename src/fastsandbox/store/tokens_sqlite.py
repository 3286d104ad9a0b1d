"""`SqliteTokenStore`: `fsb server`'s tenant token records, one small SQLite file
(`<data-dir>/tokens.db`, 0600) beside the object store's.

A file of its own rather than a table in `state.db`: token records are not API objects (no
resourceVersion, no watch), and the object store's writer owns `state.db`'s transactions.
Each row keeps the token's id, namespace, times and SHA-256 — never the token.
"""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime
from pathlib import Path

import aiosqlite

from fastsandbox.control.tokens import TokenRecord
from fastsandbox.errors import AlreadyExists, NotFound, Unavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created TEXT NOT NULL,
    expires TEXT
) WITHOUT ROWID;
"""


def _record(row: sqlite3.Row | tuple[str, str, str, str, str | None]) -> TokenRecord:
    ident, namespace, sha, created, expires = row
    return TokenRecord(
        id=ident,
        namespace=namespace,
        sha256=sha,
        created=datetime.fromisoformat(created),
        expires=datetime.fromisoformat(expires) if expires else None,
    )


class SqliteTokenStore:
    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self._path = path

    @classmethod
    async def open(cls, path: Path) -> SqliteTokenStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only before SQLite writes a byte (it keeps an existing file's mode).
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        try:
            db = await aiosqlite.connect(path)
            await db.executescript(_SCHEMA)
            await db.commit()
        except sqlite3.Error as exc:
            raise Unavailable(f"token store {path}: {exc}") from None
        return cls(db, path)

    async def close(self) -> None:
        await self._db.close()

    async def add(self, record: TokenRecord) -> None:
        try:
            await self._db.execute(
                "INSERT INTO tokens (id, namespace, sha256, created, expires) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.namespace,
                    record.sha256,
                    record.created.isoformat(),
                    record.expires.isoformat() if record.expires else None,
                ),
            )
            await self._db.commit()
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"token {record.id}: already exists") from None
        except sqlite3.Error as exc:
            raise Unavailable(f"token store {self._path}: {exc}") from None

    async def get(self, ident: str) -> TokenRecord | None:
        try:
            async with self._db.execute(
                "SELECT id, namespace, sha256, created, expires FROM tokens WHERE id = ?",
                (ident,),
            ) as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as exc:
            raise Unavailable(f"token store {self._path}: {exc}") from None
        return _record(tuple(row)) if row is not None else None

    async def list(self) -> list[TokenRecord]:
        try:
            async with self._db.execute(
                "SELECT id, namespace, sha256, created, expires FROM tokens ORDER BY created"
            ) as cursor:
                rows = await cursor.fetchall()
        except sqlite3.Error as exc:
            raise Unavailable(f"token store {self._path}: {exc}") from None
        return [_record(tuple(r)) for r in rows]

    async def delete(self, ident: str) -> None:
        try:
            cursor = await self._db.execute("DELETE FROM tokens WHERE id = ?", (ident,))
            await self._db.commit()
        except sqlite3.Error as exc:
            raise Unavailable(f"token store {self._path}: {exc}") from None
        if cursor.rowcount == 0:
            raise NotFound(f"token {ident}: not found (see fsb token list)")
