"""The cluster's own identities on the Fast-Path: TokenReview says who a bearer token is,
SubjectAccessReview whether that identity may do what a call asks (`control/fastpath/access.py`
maps each RPC to a verb on `sandboxes` or `sandboxpools` in `fastsandbox.io`).

So a ServiceAccount (or any user the apiserver authenticates by token) uses the Fast-Path with
exactly the rights Kubernetes RBAC gives it on our CRDs: `kubectl auth can-i create sandboxes
-n team-a --as=system:serviceaccount:team-a:bot` is the answer for both paths.

Answers are cached briefly (`ttl`, default 10 s; denials and unknown tokens as well), keyed by a
hash of the token and by the identity + access: a create burst costs one review, and a revoked
token or binding stops working within the TTL. The controller's own ServiceAccount needs
`create` on `tokenreviews` and `subjectaccessreviews` (deploy/rbac.yaml).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from typing import Any, Generic, TypeVar

import httpx2 as httpx
from lightkube import ApiError, AsyncClient
from lightkube.models.authentication_v1 import TokenReviewSpec
from lightkube.models.authorization_v1 import ResourceAttributes, SubjectAccessReviewSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.authentication_v1 import TokenReview
from lightkube.resources.authorization_v1 import SubjectAccessReview

from fastsandbox._kube.errors import translate
from fastsandbox.control.fastpath.access import API_GROUP, Access, Caller, Decision

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

_MAX_ENTRIES = 4096


class _TtlCache(Generic[K, V]):
    def __init__(self, ttl: float, clock: Any = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> tuple[bool, V | None]:
        hit = self._items.get(key)
        if hit is None or hit[0] < self._clock():
            self._items.pop(key, None)
            return False, None
        return True, hit[1]

    def put(self, key: K, value: V) -> None:
        self._items[key] = (self._clock() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > _MAX_ENTRIES:
            self._items.popitem(last=False)


class KubeIdentities:
    """`Authenticator` + `Authorizer` backed by the apiserver (see the module docstring)."""

    def __init__(
        self, client: AsyncClient, *, ttl: float = 10.0, audiences: tuple[str, ...] = ()
    ) -> None:
        self.client = client
        self.audiences = audiences
        self._tokens: _TtlCache[str, Caller | None] = _TtlCache(ttl)
        self._decisions: _TtlCache[tuple[Caller, Access], Decision] = _TtlCache(ttl)

    async def authenticate(self, token: str) -> Caller | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        hit, cached = self._tokens.get(key)
        if hit:
            return cached
        review = TokenReview(
            metadata=ObjectMeta(),
            spec=TokenReviewSpec(token=token, audiences=list(self.audiences) or None),
        )
        try:
            answer = await self.client.create(review)
        except (ApiError, httpx.HTTPError) as exc:
            raise translate(exc, "TokenReview") from None
        status = answer.status
        caller: Caller | None = None
        if status is not None and status.authenticated and status.user is not None:
            user = status.user
            caller = Caller(
                name=user.username or "",
                groups=tuple(user.groups or ()),
                uid=user.uid or "",
                extra=tuple(sorted((k, tuple(v)) for k, v in (user.extra or {}).items())),
            )
        elif status is not None and status.error:
            log.info("token refused by TokenReview", extra={"why": status.error})
        self._tokens.put(key, caller)
        return caller

    async def authorize(self, caller: Caller, access: Access) -> Decision:
        hit, cached = self._decisions.get((caller, access))
        if hit and cached is not None:
            return cached
        review = SubjectAccessReview(
            metadata=ObjectMeta(),
            spec=SubjectAccessReviewSpec(
                user=caller.name,
                groups=list(caller.groups),
                uid=caller.uid or None,
                extra={k: list(v) for k, v in caller.extra} or None,
                resourceAttributes=ResourceAttributes(
                    group=API_GROUP,
                    resource=access.resource,
                    verb=access.verb,
                    namespace=access.namespace or None,
                ),
            ),
        )
        try:
            answer = await self.client.create(review)
        except (ApiError, httpx.HTTPError) as exc:
            raise translate(exc, "SubjectAccessReview") from None
        status = answer.status
        allowed = bool(status and status.allowed and not status.denied)
        reason = (status.reason or status.evaluationError or "") if status else ""
        decision = Decision(allowed, reason or ("" if allowed else "Kubernetes RBAC"))
        self._decisions.put((caller, access), decision)
        return decision
