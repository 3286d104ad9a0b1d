"""The cluster's own identities on the Fast-Path: TokenReview says who a bearer token is,
SubjectAccessReview whether that identity may do what a call asks (`control/fastpath/access.py`
maps each RPC to a verb on `sandboxes` or `sandboxpools`, some with a subresource such as
`sandboxes/exec` or `sandboxes/logs`, in `fastsandbox.io`). These are the Kubernetes pair of
the `Authenticator`/`Authorizer` Protocols (`control/fastpath/authz.py`): the controller chains
`KubeAuthenticator` after the tenant tokens, and `KubeAuthorizer` answers for the identities it
authenticated, leaving the admin and tenant tokens to `NamespaceAuthorizer`.

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
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import httpx2 as httpx
from lightkube import ApiError, AsyncClient
from lightkube.models.authentication_v1 import TokenReviewSpec
from lightkube.models.authorization_v1 import ResourceAttributes, SubjectAccessReviewSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.authentication_v1 import TokenReview
from lightkube.resources.authorization_v1 import SubjectAccessReview

from fastsandbox._kube.errors import translate
from fastsandbox.api.labels import API_GROUP
from fastsandbox.control.fastpath.authz import (
    ADMIN_ONLY,
    INVALID,
    Action,
    Authorizer,
    Principal,
    bearer,
)
from fastsandbox.errors import PermissionDenied, Unauthenticated

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


KUBE_GROUP = "system:authenticated"
"""Every identity the apiserver authenticates is in this group; tenant tokens' principals are
not, so the authorizer knows whom to ask the apiserver about."""


class KubeAuthenticator:
    """`Authenticator` for tokens the apiserver knows (TokenReview); see the module docstring."""

    def __init__(
        self, client: AsyncClient, *, ttl: float = 10.0, audiences: tuple[str, ...] = ()
    ) -> None:
        self.client = client
        self.audiences = audiences
        self._tokens: _TtlCache[str, Principal | None] = _TtlCache(ttl)

    async def authenticate(self, metadata: Mapping[str, str]) -> Principal:
        token = bearer(metadata)
        key = hashlib.sha256(token.encode()).hexdigest()
        hit, principal = self._tokens.get(key)
        if not hit:
            principal = await self._review(token)
            self._tokens.put(key, principal)
        if principal is None:
            raise Unauthenticated(INVALID)
        return principal

    async def _review(self, token: str) -> Principal | None:
        review = TokenReview(
            metadata=ObjectMeta(),
            spec=TokenReviewSpec(token=token, audiences=list(self.audiences) or None),
        )
        try:
            answer = await self.client.create(review)
        except (ApiError, httpx.HTTPError) as exc:
            raise translate(exc, "TokenReview") from None
        status = answer.status
        if status is None or not status.authenticated or status.user is None:
            if status is not None and status.error:
                log.info("token refused by TokenReview", extra={"why": status.error})
            return None
        groups = tuple(status.user.groups or ())
        if KUBE_GROUP not in groups:
            groups = (*groups, KUBE_GROUP)
        return Principal(name=status.user.username or "", groups=groups)


class KubeAuthorizer:
    """`Authorizer`: a SubjectAccessReview for identities the apiserver authenticated; anyone
    else (the admin, tenant tokens) is `fallback`'s to decide. Managing tokens stays the admin
    token's, whatever RBAC says."""

    def __init__(self, client: AsyncClient, fallback: Authorizer, *, ttl: float = 10.0) -> None:
        self.client = client
        self.fallback = fallback
        self._decisions: _TtlCache[tuple[Principal, Action], tuple[bool, str]] = _TtlCache(ttl)

    async def authorize(self, principal: Principal, action: Action) -> None:
        if principal.admin or KUBE_GROUP not in principal.groups:
            await self.fallback.authorize(principal, action)
            return
        if action.resource in ADMIN_ONLY:
            raise PermissionDenied(
                f"{principal.name} may not {action.describe()}: managing tokens needs the "
                "admin token"
            )
        hit, decided = self._decisions.get((principal, action))
        if not hit or decided is None:
            decided = await self._review(principal, action)
            self._decisions.put((principal, action), decided)
        allowed, reason = decided
        if not allowed:
            why = f": {reason}" if reason else ""
            raise PermissionDenied(
                f"{principal.name} may not {action.describe()} (Kubernetes RBAC on "
                f"{API_GROUP}{why})"
            )

    async def _review(self, principal: Principal, action: Action) -> tuple[bool, str]:
        review = SubjectAccessReview(
            metadata=ObjectMeta(),
            spec=SubjectAccessReviewSpec(
                user=principal.name,
                groups=list(principal.groups),
                resourceAttributes=ResourceAttributes(
                    group=API_GROUP,
                    resource=action.resource,
                    subresource=action.subresource or None,
                    verb=action.verb,
                    namespace=action.namespace or None,
                ),
            ),
        )
        try:
            answer = await self.client.create(review)
        except (ApiError, httpx.HTTPError) as exc:
            raise translate(exc, "SubjectAccessReview") from None
        status = answer.status
        allowed = bool(status and status.allowed and not status.denied)
        return allowed, (status.reason or status.evaluationError or "") if status else ""
