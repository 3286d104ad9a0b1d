"""`fsb update` / `fsb reset` and the SDK's `update` / `reset` against the fake Fast-Path server:
the requests they build, client-side validation (exit 2, no RPC), output shapes, error codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from typer.testing import CliRunner

from fastsandbox.cli.main import app
from fastsandbox.sdk import AsyncClient, Client, Conflict, InvalidArgument, NotFound, Sandbox
from tests.unit.fastpath_fake import TOKEN, FakeFastPath, isolate_env, serve

runner = CliRunner()


@pytest.fixture(autouse=True)
def data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    return isolate_env(monkeypatch, tmp_path)


@pytest.fixture
def fake() -> FakeFastPath:
    fake = FakeFastPath()
    fake.add_sandbox("s1", labels={"keep": "1", "drop": "x"})
    return fake


@pytest.fixture
def endpoint(fake: FakeFastPath, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with serve(fake) as address:
        monkeypatch.setenv("FSB_ENDPOINT", address)
        monkeypatch.setenv("FSB_TOKEN", TOKEN)
        yield address


def fsb(*args: str) -> Any:
    return runner.invoke(app, list(args))


def last_update(fake: FakeFastPath) -> Any:
    assert fake.methods()[-1] == "Update"
    return fake.calls[-1].request


# ------------------------------------------------------------------ fsb update


def test_update_sends_only_what_was_given(fake: FakeFastPath, endpoint: str) -> None:
    result = fsb("update", "s1", "--ttl", "120", "-l", "team=ml", "--label", "drop-")
    assert result.exit_code == 0, result.output
    req = last_update(fake)
    assert (req.namespace, req.name) == ("default", "s1")
    assert req.HasField("ttl_seconds") and req.ttl_seconds == 120
    assert not req.HasField("expire_time") and not req.clear_expiry
    assert dict(req.labels) == {"team": "ml"}
    assert list(req.remove_labels) == ["drop"]
    assert not req.HasField("failure_policy")
    assert not req.HasField("recovery_timeout_seconds")
    assert "sandbox default/s1 updated" in result.stdout
    assert "keep=1,team=ml" in result.stdout


def test_update_policy_timeout_and_no_expiry(fake: FakeFastPath, endpoint: str) -> None:
    result = fsb(
        "update", "s1", "--no-expiry", "--failure-policy", "AutoRecreate",
        "--recovery-timeout", "9", "-n", "default", "-o", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    req = last_update(fake)
    assert req.clear_expiry
    assert (req.failure_policy, req.recovery_timeout_seconds) == ("AutoRecreate", 9)
    obj = json.loads(result.stdout)
    assert obj["kind"] == "Sandbox"
    assert obj["spec"]["failurePolicy"] == "AutoRecreate"
    assert obj["spec"]["recoveryTimeoutSeconds"] == 9
    assert "expireTime" not in obj["spec"]


def test_update_expire_time_yaml(fake: FakeFastPath, endpoint: str) -> None:
    result = fsb("update", "s1", "--expire-time", "2099-01-02T03:04:05Z", "-o", "yaml")
    assert result.exit_code == 0, result.output
    assert datetime.fromisoformat(last_update(fake).expire_time) == datetime(
        2099, 1, 2, 3, 4, 5, tzinfo=UTC
    )
    assert yaml.safe_load(result.stdout)["spec"]["expireTime"].startswith("2099-01-02T03:04:05")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ttl", "5", "--no-expiry"], "--ttl and --no-expiry are mutually exclusive"),
        (["--ttl", "5", "--expire-time", "2099-01-01T00:00:00Z"], "mutually exclusive"),
        (["--expire-time", "2099-01-01T00:00:00Z", "--no-expiry"], "mutually exclusive"),
        (["--failure-policy", "Never"], "spec.failurePolicy: must be Manual or AutoRecreate"),
        (["--recovery-timeout", "0"], "spec.recoveryTimeoutSeconds"),
        (["--ttl", "0"], "spec.ttlSeconds: must be positive"),
        (["--expire-time", "soon"], "spec.expireTime: must be RFC 3339"),
        (["--label", "novalue"], "--label 'novalue': expected K=V to set or K- to remove"),
        (["--label", "=v"], "expected K=V"),
        ([], "nothing to update"),
        (["--ttl", "abc"], "--ttl"),
    ],
)
def test_bad_update_flags_exit_2_before_any_call(
    fake: FakeFastPath, endpoint: str, args: list[str], message: str
) -> None:
    result = fsb("update", "s1", *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert "Update" not in fake.methods()


def test_update_server_errors_map_to_exit_codes(fake: FakeFastPath, endpoint: str) -> None:
    result = fsb("update", "ghost", "--ttl", "5")
    assert result.exit_code == 3
    assert "sandbox default/ghost not found" in result.stderr
    fake.fail("Update", grpc.StatusCode.ABORTED, "sandbox default/s1 is being deleted")
    result = fsb("update", "s1", "--ttl", "5")
    assert result.exit_code == 4
    assert "being deleted" in result.stderr
    fake.fail("Update", grpc.StatusCode.INVALID_ARGUMENT, "spec.failurePolicy: must be Manual")
    result = fsb("update", "s1", "--failure-policy", "Manual")
    assert result.exit_code == 2
    assert "spec.failurePolicy" in result.stderr


# ------------------------------------------------------------------ fsb reset


def test_reset_prints_reset_triggered(fake: FakeFastPath, endpoint: str) -> None:
    result = fsb("reset", "s1")
    assert result.exit_code == 0, result.output
    assert fake.methods()[-1] == "Reset"
    assert (fake.calls[-1].request.namespace, fake.calls[-1].request.name) == ("default", "s1")
    assert "reset triggered" in result.stdout
    assert "2025-01-02T03:04:06.000Z" in result.stdout


def test_reset_json_and_errors(fake: FakeFastPath, endpoint: str) -> None:
    result = fsb("reset", "s1", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["spec"]["resetRevision"] == "2025-01-02T03:04:06.000Z"
    assert fsb("reset", "ghost").exit_code == 3
    fake.fail("Reset", grpc.StatusCode.ABORTED, "sandbox default/s1 has expired")
    result = fsb("reset", "s1")
    assert result.exit_code == 4
    assert "has expired" in result.stderr


def test_help_lists_the_new_verbs() -> None:
    result = fsb("--help")
    assert result.exit_code == 0
    assert "update" in result.stdout and "reset" in result.stdout


# ------------------------------------------------------------------ SDK


async def test_async_update_and_reset(fake: FakeFastPath, endpoint: str) -> None:
    async with AsyncClient(endpoint, TOKEN) as client:
        sb = await client.update(
            "s1",
            ttl=timedelta(minutes=2),
            labels={"new": "v", "drop": None, "empty": ""},
            failure_policy="AutoRecreate",
            recovery_timeout=30,
        )
        req = last_update(fake)
        assert req.ttl_seconds == 120
        assert dict(req.labels) == {"new": "v", "empty": ""}
        assert list(req.remove_labels) == ["drop"]
        assert sb.metadata.labels == {"keep": "1", "new": "v", "empty": ""}
        assert sb.spec.failure_policy == "AutoRecreate"
        assert sb.spec.recovery_timeout_seconds == 30

        when = datetime(2099, 1, 1, tzinfo=UTC)
        sb = await client.update("s1", expire_time=when)
        assert sb.spec.expire_time == when
        sb = await client.update("s1", no_expiry=True)
        assert sb.spec.expire_time is None

        sb = await client.reset("s1")
        assert sb.spec.reset_revision == "2025-01-02T03:04:06.000Z"
        with pytest.raises(NotFound):
            await client.reset("ghost")


async def test_sdk_validates_before_any_call(fake: FakeFastPath, endpoint: str) -> None:
    async with AsyncClient(endpoint, TOKEN) as client:
        with pytest.raises(InvalidArgument, match="give only one of ttl, expire_time, no_expiry"):
            await client.update("s1", ttl=5, no_expiry=True)
        with pytest.raises(InvalidArgument, match=r"spec\.expireTime: needs a timezone"):
            await client.update("s1", expire_time=datetime(2099, 1, 1))
        with pytest.raises(InvalidArgument, match=r"spec\.recoveryTimeoutSeconds: too large"):
            await client.update("s1", recovery_timeout=2**40)
        with pytest.raises(InvalidArgument, match=r"metadata\.name"):
            await client.update("Bad_Name", ttl=5)
        with pytest.raises(InvalidArgument, match="nothing to update"):
            await client.update("s1", labels={})
    assert fake.methods() == []


def test_sync_client_and_handle(fake: FakeFastPath, endpoint: str) -> None:
    with Client(endpoint, TOKEN) as client:
        assert client.update("s1", labels={"x": "y"}).metadata.labels["x"] == "y"
        assert client.reset("s1").spec.reset_revision
        handle = Sandbox.create("busybox", name="h1", endpoint=endpoint, token=TOKEN)
        assert handle.update(failure_policy="AutoRecreate").spec.failure_policy == "AutoRecreate"
        assert handle.reset().spec.reset_revision == "2025-01-02T03:04:06.000Z"
        fake.fail("Update", grpc.StatusCode.ABORTED, "being deleted")
        with pytest.raises(Conflict):
            handle.update(ttl=5)
        handle.delete(wait=False)
        handle.close()
    assert [c.request.name for c in fake.calls if c.method in ("Update", "Reset")][-3:] == [
        "h1",
        "h1",
        "h1",
    ]
