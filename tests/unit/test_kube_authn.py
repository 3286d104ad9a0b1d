"""`KubeAuthenticator` / `KubeAuthorizer` (_kube/authn.py) against a fake of the one client
method they use (`create` of a TokenReview / SubjectAccessReview): who gets asked about, what
is cached, what stays the admin token's. The real apiserver: tests/e2e/test_kube_identities.py."""

from __future__ import annotations

from typing import Any, cast

import pytest
from lightkube.models.authentication_v1 import TokenReviewStatus, UserInfo
from lightkube.models.authorization_v1 import SubjectAccessReviewStatus

from fastsandbox._kube.authn import KUBE_GROUP, KubeAuthenticator, KubeAuthorizer
from fastsandbox.control.fastpath.authz import Action, NamespaceAuthorizer, Principal
from fastsandbox.errors import PermissionDenied, Unauthenticated


class FakeReviews:
    """Answers reviews: tokens in `users` are authenticated; `allowed` holds (user, verb,
    resource, namespace) that RBAC allows."""

    def __init__(self) -> None:
        self.users = {"sa-token": "system:serviceaccount:team-a:bot"}
        self.allowed = {("system:serviceaccount:team-a:bot", "create", "sandboxes", "team-a")}
        self.calls: list[Any] = []

    async def create(self, obj: Any) -> Any:
        self.calls.append(obj)
        if type(obj).__name__ == "TokenReview":
            user = self.users.get(obj.spec.token)
            obj.status = TokenReviewStatus(
                authenticated=user is not None,
                user=UserInfo(username=user, groups=["system:serviceaccounts"]) if user else None,
            )
            return obj
        attrs = obj.spec.resourceAttributes
        key = (obj.spec.user, attrs.verb, attrs.resource, attrs.namespace)
        obj.status = SubjectAccessReviewStatus(allowed=key in self.allowed)
        return obj


async def test_a_serviceaccount_token_is_a_principal_of_the_cluster() -> None:
    fake = FakeReviews()
    authn = KubeAuthenticator(cast(Any, fake))
    who = await authn.authenticate({"authorization": "Bearer sa-token"})
    assert who.name == "system:serviceaccount:team-a:bot"
    assert KUBE_GROUP in who.groups and not who.admin
    await authn.authenticate({"authorization": "Bearer sa-token"})
    assert len(fake.calls) == 1  # cached
    with pytest.raises(Unauthenticated):
        await authn.authenticate({"authorization": "Bearer nobody"})
    with pytest.raises(Unauthenticated):
        await authn.authenticate({})
    assert len(fake.calls) == 2  # a missing token is never sent for review


async def test_cluster_identities_are_reviewed_and_the_rest_left_to_the_fallback() -> None:
    fake = FakeReviews()
    authz = KubeAuthorizer(cast(Any, fake), NamespaceAuthorizer())
    bot = Principal(
        "system:serviceaccount:team-a:bot", groups=("system:serviceaccounts", KUBE_GROUP)
    )
    await authz.authorize(bot, Action("create", "sandboxes", "team-a"))
    await authz.authorize(bot, Action("create", "sandboxes", "team-a"))
    assert len(fake.calls) == 1  # cached
    with pytest.raises(PermissionDenied, match="may not create sandboxes in namespace team-b"):
        await authz.authorize(bot, Action("create", "sandboxes", "team-b"))
    with pytest.raises(PermissionDenied, match="admin token"):
        await authz.authorize(bot, Action("create", "tokens", None))
    reviews = len(fake.calls)
    # A tenant token's principal: the namespace authorizer decides, no review is made.
    tenant = Principal("token:abc", namespaces=frozenset({"team-a"}))
    await authz.authorize(tenant, Action("get", "sandboxes", "team-a"))
    with pytest.raises(PermissionDenied):
        await authz.authorize(tenant, Action("get", "sandboxes", "team-b"))
    await authz.authorize(Principal("admin", admin=True), Action("list", "sandboxes", None))
    assert len(fake.calls) == reviews
