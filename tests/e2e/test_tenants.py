"""Tenants against a real server of each shape: the RPC x credential matrix (every RPC of
fastpath.proto's descriptor x {no token, wrong token, other namespace, right namespace}),
`fsb token create|list|revoke`, a tenant's own sandbox end to end, `list -A` for admins only,
and no token in any log.

The right namespace is `default` (where the default pool is), so a tenant's sandbox needs no
pool or agent of its own; each matrix cell names a sandbox that does not exist (or carries an
invalid pool), so "past the guard" is the servicer's own NOT_FOUND / INVALID_ARGUMENT and no
cell makes anything.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import grpc
import pytest

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2_grpc
from tests.access_matrix import EXPECT, METHODS, call, request_for
from tests.e2e._kube_server import KubeServer
from tests.e2e.conftest import AnyServer

pytestmark = pytest.mark.e2e

S = grpc.StatusCode
GUARD = {S.UNAUTHENTICATED, S.PERMISSION_DENIED}
RIGHT = "default"


@pytest.fixture(scope="module")
def server(shaped_server: AnyServer) -> AnyServer:
    return shaped_server


def new_token(server: AnyServer, namespace: str, *extra: str) -> str:
    result = server.fsb("token", "create", "-n", namespace, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def tokens(server: AnyServer) -> dict[str, str]:
    return {"right": new_token(server, RIGHT, "--ttl", "1h"), "other": new_token(server, "team-b")}


async def _matrix(server: AnyServer, tokens: dict[str, str]) -> dict[tuple[str, str], S]:
    creds = grpc.ssl_channel_credentials(root_certificates=server.ca_file.read_bytes())
    got: dict[tuple[str, str], S] = {}
    async with grpc.aio.secure_channel(server.endpoint, creds) as channel:
        stub = fastpath_pb2_grpc.FastPathStub(channel)
        for method in METHODS:
            request = request_for(method, RIGHT)
            got[method, "none"] = await call(stub, method, request, None)
            got[method, "wrong"] = await call(stub, method, request, "fsb_0123456789ab_nope")
            got[method, "other"] = await call(stub, method, request, tokens["other"])
            got[method, "right"] = await call(stub, method, request, tokens["right"])
    return got


def test_every_rpc_by_every_credential(server: AnyServer, tokens: dict[str, str]) -> None:
    assert set(METHODS) == set(EXPECT), "a new RPC needs its row in tests/access_matrix.py"
    got = asyncio.run(_matrix(server, tokens))
    wrong = {}
    for method in METHODS:
        for cell in ("none", "wrong"):
            if got[method, cell] is not S.UNAUTHENTICATED:
                wrong[method, cell] = got[method, cell]
        if got[method, "other"] is not S.PERMISSION_DENIED:
            wrong[method, "other"] = got[method, "other"]
        right = got[method, "right"]
        if (EXPECT[method] == "ok") == (right in GUARD):
            wrong[method, "right"] = right
        if EXPECT[method] == "admin" and right is not S.PERMISSION_DENIED:
            wrong[method, "right"] = right
    assert wrong == {}, f"cells answered otherwise than expected: {wrong}"


def test_a_tenant_works_in_its_namespace_only(
    server: AnyServer, tokens: dict[str, str], demo_image: str, tmp_path: Path
) -> None:
    right, other = tmp_path / "right.token", tmp_path / "other.token"
    right.write_text(tokens["right"])
    other.write_text(tokens["other"])
    as_right = {"FSB_TOKEN_FILE": str(right), "FSB_TOKEN": ""}
    as_other = {"FSB_TOKEN_FILE": str(other), "FSB_TOKEN": ""}
    name = f"tenant-{os.getpid()}"
    made = server.fsb("run", name, "--image", demo_image, "-e", "SECRET=s3", env=as_right)
    assert made.returncode == 0, made.stderr
    try:
        ran = server.fsb("exec", name, "--", "echo", "inside", env=as_right)
        assert (ran.returncode, ran.stdout.strip()) == (0, "inside"), ran.stderr
        # Another namespace's token: refused, and the message names the namespace.
        for argv in (["get", name], ["exec", name, "--", "true"], ["delete", name]):
            refused = server.fsb(*argv, env=as_other)
            assert refused.returncode == 6, (argv, refused.stderr)
            assert f"namespace {RIGHT}" in refused.stderr, refused.stderr
        listed = server.fsb("list", "-A", env=as_right)
        assert listed.returncode == 6 and "every namespace" in listed.stderr
        mine = server.fsb("list", "-o", "json", env=as_right)
        assert mine.returncode == 0 and name in mine.stdout
        assert server.fsb("list", "-A").returncode == 0  # the admin may
        tokens_listed = server.fsb("token", "list", env=as_right)
        assert tokens_listed.returncode == 6 and "admin" in tokens_listed.stderr
    finally:
        server.fsb("delete", name, "--wait")


def test_token_list_and_revoke(server: AnyServer) -> None:
    token = new_token(server, "team-c")
    listed = server.fsb("token", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    items = {t["id"]: t for t in json.loads(listed.stdout)["items"]}
    ident = token.split("_")[1]
    assert items[ident]["namespace"] == "team-c"
    assert token not in listed.stdout and token.split("_")[2] not in listed.stdout
    file = Path(server.ca_file).parent / f"revoke-{os.getpid()}.token"
    file.write_text(token)
    try:
        env = {"FSB_TOKEN_FILE": str(file), "FSB_TOKEN": ""}
        assert server.fsb("list", "-n", "team-c", env=env).returncode == 0
        assert server.fsb("token", "revoke", ident).returncode == 0
        after = server.fsb("list", "-n", "team-c", env=env)
        assert after.returncode == 6 and "invalid API token" in after.stderr
        again = server.fsb("token", "revoke", ident)
        assert again.returncode == 3, again.stderr
    finally:
        file.unlink(missing_ok=True)


def _logs(server: AnyServer) -> list[Path]:
    root = server.work_dir if isinstance(server, KubeServer) else server.data_dir
    return [p for p in root.rglob("*") if p.is_file() and (".log" in p.name or "log" in p.parts)]


def test_no_token_in_any_log(server: AnyServer, tokens: dict[str, str]) -> None:
    """After the tests above (creates, execs, refusals, token RPCs) no log holds a token."""
    secrets_ = [tokens["right"], tokens["other"], server.token]
    logs = _logs(server)
    assert logs, "no logs found: the test would prove nothing"
    if isinstance(server, KubeServer):
        said = "".join("".join(r.output) for r in server.replicas)
    else:
        said = "".join(server.output)
    for secret in secrets_:
        assert secret not in said
        for log in logs:
            assert secret.encode() not in log.read_bytes(), f"token found in {log}"
    if not isinstance(server, KubeServer):
        # Tenant tokens are nowhere in the data dir: the store keeps their hash.
        for path in server.data_dir.rglob("*"):
            if path.is_file() and not path.is_socket():
                data = path.read_bytes() if path.stat().st_size < 64 << 20 else b""
                for secret in (tokens["right"], tokens["other"]):
                    assert secret.encode() not in data, f"tenant token found in {path}"
