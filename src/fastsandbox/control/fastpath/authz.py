"""Who is calling (`Authenticator`) and what they may do (`Authorizer`): the Fast-Path's two
security decisions, each behind a small Protocol so another backend can make them.

The built-in pair is token based: the server's own token (`<data-dir>/token`, or Secret
`fastsandbox-api-token` on Kubernetes) is the admin; a tenant token (`control.tokens`) may act
only in its namespace. A Kubernetes pair (TokenReview + SubjectAccessReview) plugs in the same
way: `authenticate` turns a ServiceAccount bearer token into a `Principal` (its `name` the
username, `groups` its groups), `authorize` asks the apiserver whether that user may do the
`Action` — the verbs and resources are named as RBAC names them (`create sandboxes`,
`get sandboxes/logs`, ...) so a Role written for kubectl says the same for the Fast-Path. Chain
several with `FirstAuthenticator` (the first that recognises the credential answers).

Each `Action` comes from the RPC's row in `control.fastpath.access.RULES`; an RPC without a row
is never served.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from fastsandbox.control.tokens import TokenRecord, TokenStore, token_id
from fastsandbox.errors import PermissionDenied, Unauthenticated

MISSING = "missing API token: use --token-file or set FSB_TOKEN"
INVALID = "invalid API token: check --token-file / FSB_TOKEN"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `admin` may do anything; otherwise `namespaces` bounds it (for
    an authorizer that asks someone else, like SubjectAccessReview, it may stay empty)."""

    name: str
    admin: bool = False
    namespaces: frozenset[str] = frozenset()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Action:
    """One thing a call does, in RBAC's words: `verb` on `resource[/subresource]` in
    `namespace` (None: across every namespace, e.g. `fsb list -A`)."""

    verb: str
    resource: str
    namespace: str | None
    subresource: str = ""

    def describe(self) -> str:
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        where = f"namespace {self.namespace}" if self.namespace else "every namespace"
        return f"{self.verb} {what} in {where}"


class Authenticator(Protocol):
    async def authenticate(self, metadata: Mapping[str, str]) -> Principal:
        """The caller named by the call's metadata; Unauthenticated when there is none or
        it is not valid. Never logs the credential."""
        ...


class Authorizer(Protocol):
    async def authorize(self, principal: Principal, action: Action) -> None:
        """Return when `principal` may do `action`; PermissionDenied (naming the namespace)
        otherwise."""
        ...


def bearer(metadata: Mapping[str, str]) -> str:
    """The token of `authorization: Bearer <token>`; Unauthenticated when absent."""
    value = metadata.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if not value or scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(MISSING)
    return token.strip()


ADMIN = Principal(name="admin", admin=True)


@dataclass
class TokenAuthenticator:
    """The admin token, else a tenant token looked up by its id and checked by its hash.

    `cache_seconds` keeps a looked-up record that long (a store on the network, Kubernetes);
    `forget` drops one at once (a revoke on this replica takes effect on the next call).
    """

    admin_token: str
    store: TokenStore
    cache_seconds: float = 0.0
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _cache: dict[str, tuple[float, TokenRecord | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.admin_token:
            raise ValueError("an empty admin token would let anyone in")

    def forget(self, ident: str) -> None:
        self._cache.pop(ident, None)

    async def _record(self, ident: str) -> TokenRecord | None:
        if self.cache_seconds > 0:
            hit = self._cache.get(ident)
            if hit is not None and time.monotonic() - hit[0] < self.cache_seconds:
                return hit[1]
        record = await self.store.get(ident)
        if self.cache_seconds > 0:
            self._cache[ident] = (time.monotonic(), record)
        return record

    async def authenticate(self, metadata: Mapping[str, str]) -> Principal:
        token = bearer(metadata)
        if hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return ADMIN
        ident = token_id(token)
        record = await self._record(ident) if ident is not None else None
        if record is None or not record.matches(token):
            raise Unauthenticated(INVALID)
        if record.expired(self.clock()):
            raise Unauthenticated(f"API token {record.id} expired: ask for a new one")
        return Principal(name=f"token:{record.id}", namespaces=frozenset({record.namespace}))


@dataclass
class FirstAuthenticator:
    """Try each in turn; the first that accepts answers. Only when every one refuses is the
    call refused, with the first refusal (a missing token reads as missing)."""

    chain: Sequence[Authenticator]

    async def authenticate(self, metadata: Mapping[str, str]) -> Principal:
        first: Unauthenticated | None = None
        for one in self.chain:
            try:
                return await one.authenticate(metadata)
            except PermissionDenied:
                raise
            except Unauthenticated as exc:
                first = first or exc
        raise first or Unauthenticated(MISSING)


# Resources only an admin touches, whatever its namespaces.
ADMIN_ONLY = frozenset({"tokens"})


class NamespaceAuthorizer:
    """Admins may do anything; everyone else only within their `namespaces`, and never across
    every namespace at once nor on tokens."""

    async def authorize(self, principal: Principal, action: Action) -> None:
        if principal.admin:
            return
        if action.resource in ADMIN_ONLY:
            raise PermissionDenied(
                f"{principal.name} may not {action.describe()}: managing tokens needs the "
                "admin token"
            )
        if action.namespace is None:
            raise PermissionDenied(
                f"{principal.name} may not {action.describe()}: only an admin may; "
                f"name a namespace (-n {_scope(principal)})"
            )
        if action.namespace not in principal.namespaces:
            raise PermissionDenied(
                f"{principal.name} may not {action.describe()}: it is scoped to namespace "
                f"{_scope(principal)}"
            )


def _scope(principal: Principal) -> str:
    return ", ".join(sorted(principal.namespaces)) or "(none)"
