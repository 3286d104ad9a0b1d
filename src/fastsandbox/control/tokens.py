"""Tenant API tokens: each scoped to one namespace, stored only as a SHA-256 hash.

A token reads `fsb_<id>_<secret>`: `id` (12 hex digits) names the record, so checking a token is
one lookup by key rather than a scan, and `secret` is 256 bits from `secrets`. Since the whole
token has that much entropy, a plain SHA-256 is as good as a slow password hash here: nothing
can be guessed from the digest. The secret is printed once, by `fsb token create`; the store
never holds it, the logs never see it.

Where records live is a `TokenStore` (SQLite next to `fsb server`'s state, Secrets in the
controller's namespace on Kubernetes); `MemoryTokenStore` is the in-package fake.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from fastsandbox.errors import InvalidArgument, NotFound

PREFIX = "fsb_"
ID_HEX = 12


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(token: str) -> str | None:
    """The record id a token names, or None when it is not shaped like a tenant token."""
    if not token.startswith(PREFIX):
        return None
    ident, sep, rest = token[len(PREFIX) :].partition("_")
    if not sep or not rest or len(ident) != ID_HEX:
        return None
    try:
        int(ident, 16)
    except ValueError:
        return None
    return ident


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What is kept of a token: never the token itself."""

    id: str
    namespace: str
    sha256: str
    created: datetime
    expires: datetime | None = None

    def expired(self, at: datetime) -> bool:
        return self.expires is not None and at >= self.expires

    def matches(self, token: str) -> bool:
        return hmac.compare_digest(digest(token), self.sha256)


def new_token(namespace: str, created: datetime, ttl: timedelta | None) -> tuple[str, TokenRecord]:
    """A fresh token and the record to store for it."""
    if ttl is not None and ttl.total_seconds() <= 0:
        raise InvalidArgument("ttl: must be positive")
    ident = secrets.token_hex(ID_HEX // 2)
    token = f"{PREFIX}{ident}_{secrets.token_urlsafe(32)}"
    expires = created + ttl if ttl is not None else None
    return token, TokenRecord(ident, namespace, digest(token), created, expires)


class TokenStore(Protocol):
    """Where token records live. `get` answers None for an unknown id (a refused token, not an
    error worth a status of its own)."""

    async def add(self, record: TokenRecord) -> None: ...

    async def get(self, ident: str) -> TokenRecord | None: ...

    async def list(self) -> list[TokenRecord]: ...

    async def delete(self, ident: str) -> None:
        """NotFound when there is no such record."""
        ...


class MemoryTokenStore:
    """The in-process `TokenStore` (unit tests)."""

    def __init__(self) -> None:
        self._records: dict[str, TokenRecord] = {}

    async def add(self, record: TokenRecord) -> None:
        self._records[record.id] = record

    async def get(self, ident: str) -> TokenRecord | None:
        return self._records.get(ident)

    async def list(self) -> list[TokenRecord]:
        return sorted(self._records.values(), key=lambda r: r.created)

    async def delete(self, ident: str) -> None:
        if self._records.pop(ident, None) is None:
            raise NotFound(f"token {ident}: not found")
