"""The Fast-Path of `fsb controller` accepts the cluster's own identities: a ServiceAccount token,
checked with TokenReview and authorized per call with SubjectAccessReview, on a real
kube-apiserver (RBAC on) with the controller's replicas as users run them.

ServiceAccount `bot` has a Role on sandboxes in `default` (the namespace whose pool has agents
here: "team-a"). It creates, reads, lists and deletes a real sandbox there; in another namespace
("team-b"), across all namespaces and on pools it gets PERMISSION_DENIED; no token or a token
the apiserver does not know is UNAUTHENTICATED. `kubectl auth can-i` agrees on every answer.

Run: `.venv/bin/pytest -m kubernetes tests/e2e/test_kube_identities.py`.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lightkube import ApiError
from lightkube.models.authentication_v1 import TokenRequestSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.models.rbac_v1 import PolicyRule, RoleRef, Subject
from lightkube.resources.core_v1 import Namespace, ServiceAccount, ServiceAccountToken
from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding

from fastsandbox.errors import PermissionDenied, Unauthenticated
from fastsandbox.sdk.aio import AsyncClient
from tests.e2e._kube_server import NAMESPACE, KubeServer, purge_kube
from tests.e2e.conftest import start_kube_server

pytestmark = [pytest.mark.e2e, pytest.mark.kubernetes]

BOT = "fsb-bot"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kube_server(request: pytest.FixtureRequest) -> Iterator[KubeServer]:
    srv = start_kube_server(request, replicas=1)
    try:
        yield srv
    finally:
        purge_kube(srv)


@pytest.fixture(scope="module")
def team_b(kube_server: KubeServer) -> Iterator[str]:
    name = f"team-b-{uuid.uuid4().hex[:6]}"
    with contextlib.closing(kube_server.admin()) as client:
        client.create(Namespace(metadata=ObjectMeta(name=name)))
    yield name
    with contextlib.closing(kube_server.admin()) as client, contextlib.suppress(ApiError):
        client.delete(Namespace, name)


@pytest.fixture(scope="module")
def bot_token(kube_server: KubeServer) -> Iterator[str]:
    """A ServiceAccount with a Role on sandboxes in `default` only, and a token for it
    (TokenRequest: the apiserver signs it with its ServiceAccount key)."""
    meta = ObjectMeta(name=BOT, namespace=NAMESPACE)
    with contextlib.closing(kube_server.admin()) as client:
        client.create(ServiceAccount(metadata=meta))
        client.create(
            Role(
                metadata=meta,
                rules=[
                    PolicyRule(
                        apiGroups=["fastsandbox.io"],
                        resources=["sandboxes"],
                        verbs=["create", "get", "list", "delete", "update"],
                    )
                ],
            )
        )
        client.create(
            RoleBinding(
                metadata=meta,
                roleRef=RoleRef(apiGroup="rbac.authorization.k8s.io", kind="Role", name=BOT),
                subjects=[Subject(kind="ServiceAccount", name=BOT, namespace=NAMESPACE)],
            )
        )
        minted = client.create(
            ServiceAccountToken(
                metadata=ObjectMeta(),
                spec=TokenRequestSpec(audiences=[], expirationSeconds=3600),
            ),
            BOT,
            namespace=NAMESPACE,
        )
    assert minted.status is not None
    yield minted.status.token
    with contextlib.closing(kube_server.admin()) as client:
        for kind in (RoleBinding, Role, ServiceAccount):
            with contextlib.suppress(ApiError):
                client.delete(kind, BOT, namespace=NAMESPACE)


@functools.cache
def kubectl_binary() -> str:
    out = subprocess.run(
        [str(ROOT / "scripts" / "build-kube-apiserver")],
        capture_output=True, text=True, timeout=45 * 60, check=True,
    ).stdout  # fmt: skip
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)["KUBECTL"]


def kubectl_can_i(server: KubeServer, *args: str) -> bool:
    kubectl = kubectl_binary()
    proc = subprocess.run(
        [kubectl, "--kubeconfig", str(server.kubeconfig), "auth", "can-i", *args,
         f"--as=system:serviceaccount:{NAMESPACE}:{BOT}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return proc.stdout.strip().splitlines()[0] == "yes"


async def test_a_serviceaccount_works_where_rbac_lets_it_and_nowhere_else(
    kube_server: KubeServer, bot_token: str, team_b: str, demo_image: str
) -> None:
    bot = AsyncClient(
        kube_server.endpoint, bot_token, NAMESPACE, timeout=120, ca_file=kube_server.ca_file
    )
    name = f"bot-{uuid.uuid4().hex[:6]}"
    try:
        made = await bot.create(name, demo_image, command=["sleep", "3600"])
        assert made.namespace == NAMESPACE
        assert (await bot.get(name)).phase == "Running"
        assert name in [s.name for s in await bot.list()]

        with pytest.raises(PermissionDenied) as denied:
            await bot.create(name, demo_image, command=["sleep", "3600"], namespace=team_b)
        said = str(denied.value)
        assert f"system:serviceaccount:{NAMESPACE}:{BOT}" in said
        assert f"create sandboxes in namespace {team_b}" in said
        assert "Kubernetes RBAC" in said
        with pytest.raises(PermissionDenied):
            await bot.get(name, namespace=team_b)
        with pytest.raises(PermissionDenied, match="in every namespace"):
            await bot.list(all_namespaces=True)
        with pytest.raises(PermissionDenied, match="sandboxpools"):
            await bot.list_pools()
        with pytest.raises(PermissionDenied, match="sandboxpools"):
            await bot.create_pool("bots-pool")

        # `kubectl auth can-i` is the truth for both paths.
        assert kubectl_can_i(kube_server, "create", "sandboxes.fastsandbox.io", "-n", NAMESPACE)
        assert not kubectl_can_i(kube_server, "create", "sandboxes.fastsandbox.io", "-n", team_b)
        assert not kubectl_can_i(kube_server, "list", "sandboxes.fastsandbox.io", "-A")
        assert not kubectl_can_i(
            kube_server, "create", "sandboxpools.fastsandbox.io", "-n", NAMESPACE
        )

        assert await bot.delete(name, wait=True) in ("Deleted", "Terminating")
    finally:
        with contextlib.suppress(Exception):
            await bot.delete(name, wait=True)
        await bot.close()


@pytest.mark.parametrize("token", ["", "not-a-kubernetes-token", "eyJhbGciOiJSUzI1NiJ9.e30.sig"])
async def test_no_or_an_unknown_token_is_unauthenticated(
    kube_server: KubeServer, token: str
) -> None:
    client = AsyncClient(
        kube_server.endpoint, token or None, NAMESPACE, timeout=60, ca_file=kube_server.ca_file
    )
    try:
        with pytest.raises(Unauthenticated) as info:
            await client.list()
        assert not isinstance(info.value, PermissionDenied)
    finally:
        await client.close()


async def test_the_admin_token_still_does_everything(kube_server: KubeServer) -> None:
    admin = AsyncClient(
        kube_server.endpoint, kube_server.token, NAMESPACE, timeout=60, ca_file=kube_server.ca_file
    )
    try:
        await admin.list(all_namespaces=True)
        assert "default-pool" in [p.metadata.name for p in await admin.list_pools()]
    finally:
        await admin.close()
