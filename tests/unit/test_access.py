"""The Fast-Path's access guard over a bare servicer (every RPC UNIMPLEMENTED behind it), so each
cell of the RPC x credential matrix shows only what the guard decided; plus the token
authenticator, the namespace authorizer and TLS trust from a data dir, without a server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2_grpc
from fastsandbox.control.fastpath.access import RULES, AccessGuard, check_rules
from fastsandbox.control.fastpath.authz import (
    Action,
    NamespaceAuthorizer,
    Principal,
    TokenAuthenticator,
)
from fastsandbox.control.fastpath.tls import data_dir_tls, server_names
from fastsandbox.control.tokens import MemoryTokenStore, new_token, token_id
from fastsandbox.errors import InvalidArgument, PermissionDenied, Unauthenticated
from fastsandbox.sdk._core import resolve
from tests.access_matrix import EXPECT, METHODS, call, request_for

ADMIN = "admin-token-for-tests"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_every_rpc_has_an_access_rule_and_a_matrix_row() -> None:
    check_rules()
    assert set(RULES) == set(METHODS) == set(EXPECT)


def test_check_rules_names_an_rpc_without_a_rule() -> None:
    partial = {k: v for k, v in RULES.items() if k != "Exec"}
    with pytest.raises(RuntimeError, match="no rule for \\['Exec'\\]"):
        check_rules(partial)


async def test_token_authenticator() -> None:
    store = MemoryTokenStore()
    auth = TokenAuthenticator(ADMIN, store, clock=lambda: NOW)
    token, record = new_token("team-a", NOW, timedelta(hours=1))
    await store.add(record)
    assert token_id(token) == record.id and token not in repr(record)
    assert (await auth.authenticate({"authorization": f"Bearer {ADMIN}"})).admin
    tenant = await auth.authenticate({"authorization": f"Bearer {token}"})
    assert (tenant.admin, tenant.namespaces) == (False, frozenset({"team-a"}))
    with pytest.raises(Unauthenticated, match="missing API token"):
        await auth.authenticate({})
    for wrong in ("nope", token[:-2] + "xx", f"fsb_{'0' * 12}_abc"):
        with pytest.raises(Unauthenticated, match="invalid API token"):
            await auth.authenticate({"authorization": f"Bearer {wrong}"})
    later = TokenAuthenticator(ADMIN, store, clock=lambda: NOW + timedelta(hours=2))
    with pytest.raises(Unauthenticated, match="expired"):
        await later.authenticate({"authorization": f"Bearer {token}"})
    await store.delete(record.id)
    with pytest.raises(Unauthenticated):
        await auth.authenticate({"authorization": f"Bearer {token}"})


async def test_namespace_authorizer() -> None:
    authz = NamespaceAuthorizer()
    tenant = Principal(name="token:x", namespaces=frozenset({"team-a"}))
    await authz.authorize(tenant, Action("get", "sandboxes", "team-a"))
    await authz.authorize(Principal(name="admin", admin=True), Action("list", "tokens", None))
    with pytest.raises(PermissionDenied, match=r"namespace team-b.*scoped to namespace team-a"):
        await authz.authorize(tenant, Action("get", "sandboxes", "team-b"))
    with pytest.raises(PermissionDenied, match="every namespace"):
        await authz.authorize(tenant, Action("list", "sandboxes", None))
    with pytest.raises(PermissionDenied, match="admin token"):
        await authz.authorize(tenant, Action("create", "tokens", None))


@pytest.fixture
async def guarded() -> AsyncIterator[tuple[fastpath_pb2_grpc.FastPathStub, str, str]]:
    store = MemoryTokenStore()
    mine, rec_a = new_token("team-a", datetime.now(UTC), None)
    other, rec_b = new_token("team-b", datetime.now(UTC), None)
    await store.add(rec_a)
    await store.add(rec_b)
    guard = AccessGuard(TokenAuthenticator(ADMIN, store), NamespaceAuthorizer())
    server = grpc.aio.server(interceptors=[guard])
    fastpath_pb2_grpc.add_FastPathServicer_to_server(fastpath_pb2_grpc.FastPathServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield fastpath_pb2_grpc.FastPathStub(channel), mine, other
    finally:
        await channel.close()
        await server.stop(None)


async def test_matrix_over_a_bare_servicer(
    guarded: tuple[fastpath_pb2_grpc.FastPathStub, str, str],
) -> None:
    stub, mine, other = guarded
    S = grpc.StatusCode
    # A bare servicer answers UNIMPLEMENTED: that is "the guard let it through".
    passed = {"ok": S.UNIMPLEMENTED, "admin": S.PERMISSION_DENIED}
    got: dict[tuple[str, str], S] = {}
    for method in METHODS:
        request = request_for(method, "team-a")
        got[method, "none"] = await call(stub, method, request, None)
        got[method, "wrong"] = await call(stub, method, request, "fsb_0123456789ab_wrong")
        got[method, "other"] = await call(stub, method, request, other)
        got[method, "right"] = await call(stub, method, request, mine)
        got[method, "admin"] = await call(stub, method, request, ADMIN)
    want = {}
    for method in METHODS:
        want[method, "none"] = want[method, "wrong"] = S.UNAUTHENTICATED
        want[method, "other"] = S.PERMISSION_DENIED
        want[method, "right"] = passed[EXPECT[method]]
        want[method, "admin"] = S.UNIMPLEMENTED
    assert got == want


async def test_list_all_namespaces_is_admin_only(
    guarded: tuple[fastpath_pb2_grpc.FastPathStub, str, str],
) -> None:
    stub, mine, _ = guarded
    everything = request_for("List", "")
    assert await call(stub, "List", everything, mine) is grpc.StatusCode.PERMISSION_DENIED
    assert await call(stub, "List", everything, ADMIN) is grpc.StatusCode.UNIMPLEMENTED


async def test_pool_json_names_its_namespace(
    guarded: tuple[fastpath_pb2_grpc.FastPathStub, str, str],
) -> None:
    stub, mine, _ = guarded
    req = request_for("CreatePool", "team-a")
    req.object_json = json.dumps({"metadata": {"name": "p", "namespace": "team-b"}})
    assert await call(stub, "CreatePool", req, mine) is grpc.StatusCode.PERMISSION_DENIED
    req.object_json = json.dumps({"metadata": {"name": "p"}})  # no namespace: default
    assert await call(stub, "CreatePool", req, mine) is grpc.StatusCode.PERMISSION_DENIED
    req.object_json = "{not json"
    assert await call(stub, "CreatePool", req, mine) is grpc.StatusCode.INVALID_ARGUMENT


def test_tls_files_are_owner_only_and_clients_trust_them(tmp_path: Path) -> None:
    material = data_dir_tls(tmp_path / "tls", server_names("127.0.0.1:9999"))
    for f in (tmp_path / "tls").iterdir():
        assert f.stat().st_mode & 0o077 == 0, f
    again = data_dir_tls(tmp_path / "tls", server_names("127.0.0.1:9999"))
    assert again.ca_pem == material.ca_pem  # the CA is made once
    env = {"FSB_DATA_DIR": str(tmp_path), "HOME": str(tmp_path), "FSB_TOKEN": "t"}
    resolved = resolve(env=env)
    assert resolved.tls and resolved.ca_pem == material.ca_pem
    assert not resolve(env=env | {"FSB_INSECURE": "1"}).tls
    with pytest.raises(InvalidArgument, match=r"FSB_INSECURE.*loopback"):
        resolve(env=env | {"FSB_INSECURE": "1", "FSB_ENDPOINT": "10.1.2.3:9090"})
    (tmp_path / "client.json").write_text('{"endpoint": "127.0.0.1:7000", "tls": false}')
    local = resolve(env=env)
    assert (local.endpoint, local.tls) == ("127.0.0.1:7000", False)


async def test_tls_round_trip_with_the_data_dir_ca(tmp_path: Path) -> None:
    from fastsandbox.sdk.aio import AsyncClient

    material = data_dir_tls(tmp_path / "tls", server_names("127.0.0.1:0"))
    guard = AccessGuard(TokenAuthenticator(ADMIN, MemoryTokenStore()), NamespaceAuthorizer())
    server = grpc.aio.server(interceptors=[guard])
    fastpath_pb2_grpc.add_FastPathServicer_to_server(fastpath_pb2_grpc.FastPathServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", material.credentials())
    await server.start()
    try:
        (tmp_path / "token").write_text(ADMIN)
        env_endpoint = f"127.0.0.1:{port}"
        client = AsyncClient(env_endpoint, ca_file=tmp_path / "tls" / "ca.crt", token=ADMIN)
        # Past TLS and the guard: the bare servicer's UNIMPLEMENTED becomes "upgrade fsb server".
        with pytest.raises(Exception, match="does not support this call"):
            await client.list_raw()
        await client.close()
        plain = AsyncClient(env_endpoint, token=ADMIN, insecure=True)
        with pytest.raises(Exception, match=r"cannot reach"):
            await asyncio.wait_for(plain.list_raw(), 10)
        await plain.close()
    finally:
        await server.stop(None)


async def test_list_blanks_env_values_the_caller_may_not_read() -> None:
    """An authorizer that grants `list` but not `get` in a namespace (as RBAC may): the names
    of the variables stay, their values do not."""
    from fastsandbox.api.models import EnvVar, ObjectMeta, Sandbox, SandboxSpec
    from fastsandbox.control.fastpath import access
    from fastsandbox.control.fastpath.service import _readable

    class ListOnly:
        async def authorize(self, principal: Principal, action: Action) -> None:
            if action.verb == "get" and action.namespace == "team-b":
                raise PermissionDenied("no get in team-b")

    def sandbox(ns: str) -> Sandbox:
        spec = SandboxSpec(image="x", pool_ref="p", env=[EnvVar(name="SECRET", value="s3")])
        return Sandbox(metadata=ObjectMeta(name="a", namespace=ns), spec=spec)

    caller = access.Caller(Principal(name="rbac-user"), ListOnly())
    token = access._CALLER.set(caller)
    try:
        shown = await _readable([sandbox("team-a"), sandbox("team-b")])
    finally:
        access._CALLER.reset(token)
    assert [(e.name, e.value) for e in shown[0].spec.env] == [("SECRET", "s3")]
    assert [(e.name, e.value) for e in shown[1].spec.env] == [("SECRET", "")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--insecure", "--listen", "0.0.0.0:19999"], "--insecure: plaintext is allowed only"),
        (["--tls-cert", "/nonexistent.crt"], "--tls-cert and --tls-key: give both"),
        (["--insecure", "--tls-cert", "a", "--tls-key", "b"], "--insecure: cannot serve"),
    ],
)
@pytest.mark.parametrize("verb", ["server", "controller"])
def test_serving_flags_are_checked_naming_the_flag(
    verb: str, argv: list[str], message: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from fastsandbox.cli.main import build_app

    result = CliRunner().invoke(build_app([verb]), [verb, *argv])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


async def test_first_authenticator_asks_each_in_turn() -> None:
    """How a second identity source (e.g. TokenReview) chains after the token one."""
    from fastsandbox.control.fastpath.authz import FirstAuthenticator

    class ServiceAccounts:
        async def authenticate(self, metadata: dict[str, str]) -> Principal:
            if metadata.get("authorization") == "Bearer sa-token":
                return Principal(name="system:serviceaccount:team-a:ci", groups=("sa",))
            raise Unauthenticated("not a ServiceAccount token")

    chain = FirstAuthenticator([TokenAuthenticator(ADMIN, MemoryTokenStore()), ServiceAccounts()])
    assert (await chain.authenticate({"authorization": f"Bearer {ADMIN}"})).admin
    sa = await chain.authenticate({"authorization": "Bearer sa-token"})
    assert sa.name == "system:serviceaccount:team-a:ci"
    with pytest.raises(Unauthenticated, match="invalid API token"):
        await chain.authenticate({"authorization": "Bearer neither"})
    with pytest.raises(Unauthenticated, match="missing API token"):
        await chain.authenticate({})
