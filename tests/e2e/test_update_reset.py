"""`fsb update` and `fsb reset` end to end, on both shapes (a real `fsb server` with real
containerd + runc and SQLite, and `fsb controller` replicas on a real kube-apiserver): the spec
fields they change, the errors they refuse with, and what a reset does to the container."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.e2e.conftest import AnyServer

pytestmark = pytest.mark.e2e

SLEEP = ["--", "sleep", "3600"]


@pytest.fixture(scope="module")
def server(shaped_server: AnyServer) -> AnyServer:
    return shaped_server


@pytest.fixture
def sandbox(server: AnyServer, demo_image: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A running sandbox named after the test, deleted afterwards whatever happened."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower())
    name = name[:50].strip("-")
    result = server.fsb("run", name, "--image", demo_image, *SLEEP)
    assert result.returncode == 0, result.stderr
    try:
        yield name
    finally:
        server.fsb("delete", name, "--wait")


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_update_ttl_labels_policy_then_no_expiry(server: AnyServer, sandbox: str) -> None:
    before = datetime.now(UTC)
    obj = server.fsb_json("update", sandbox, "--ttl", "3600", "--label", "team=ml", "-l", "x=1")
    after = datetime.now(UTC)
    expires = parse(obj["spec"]["expireTime"])
    # The server's clock, with a second of slack either side for the CLI's start-up.
    hour = timedelta(seconds=3600)
    assert before + hour - timedelta(seconds=1) <= expires <= after + hour + timedelta(seconds=1)
    assert obj["metadata"]["labels"] == {"team": "ml", "x": "1"}

    obj = server.fsb_json(
        "update", sandbox, "--failure-policy", "AutoRecreate", "--recovery-timeout", "15",
        "--label", "x-",
    )  # fmt: skip
    assert obj["spec"]["failurePolicy"] == "AutoRecreate"
    assert obj["spec"]["recoveryTimeoutSeconds"] == 15
    assert obj["metadata"]["labels"] == {"team": "ml"}
    assert parse(obj["spec"]["expireTime"]) == expires  # untouched by an unrelated update

    result = server.fsb("update", sandbox, "--no-expiry")
    assert result.returncode == 0, result.stderr
    assert f"sandbox default/{sandbox} updated" in result.stdout

    got = server.fsb_json("get", sandbox)
    assert "expireTime" not in got["spec"]
    assert got["spec"]["failurePolicy"] == "AutoRecreate"
    assert got["metadata"]["labels"] == {"team": "ml"}
    assert got["status"]["phase"] == "Running"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--failure-policy", "Sometimes"], "spec.failurePolicy"),
        (["--recovery-timeout", "0"], "spec.recoveryTimeoutSeconds"),
        (["--ttl", "-3"], "spec.ttlSeconds"),
        (["--expire-time", "next-week"], "spec.expireTime"),
        (["--ttl", "5", "--no-expiry"], "mutually exclusive"),
    ],
)
def test_bad_values_exit_2_naming_the_field(
    server: AnyServer, sandbox: str, args: list[str], named: str
) -> None:
    before = server.fsb_json("get", sandbox)
    result = server.fsb("update", sandbox, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert named in result.stderr
    after = server.fsb_json("get", sandbox)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_unknown_sandbox_exits_3(server: AnyServer) -> None:
    assert server.fsb("update", "no-such-sandbox", "--ttl", "5").returncode == 3
    assert server.fsb("reset", "no-such-sandbox").returncode == 3


def wait_observed(server: AnyServer, name: str, revision: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    got: Any = {}
    while time.monotonic() < deadline:
        got = server.fsb_json("get", name)
        if got["status"].get("observedResetRevision") == revision:
            return got
        time.sleep(0.2)
    raise AssertionError(f"observedResetRevision never became {revision}: {got.get('status')}")


def test_reset_sets_a_revision_and_recreates_the_container(server: AnyServer, sandbox: str) -> None:
    old = server.fsb_json("get", sandbox)["status"]["containerID"]

    result = server.fsb("reset", sandbox)
    assert result.returncode == 0, result.stderr
    assert "reset triggered" in result.stdout
    revision = server.fsb_json("get", sandbox)["spec"]["resetRevision"]
    assert revision and revision in result.stdout
    again = json.loads(server.fsb("reset", sandbox, "-o", "json").stdout)["spec"]["resetRevision"]
    assert parse(again) > parse(revision)

    # The control plane's reaction (a new container, then observedResetRevision).
    got = wait_observed(server, sandbox, again)
    assert got["status"]["phase"] == "Running"
    new = got["status"]["containerID"]
    assert new and new != old
    deadline = time.monotonic() + 15
    while old in server.containers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert old not in server.containers()
    assert new in server.running_tasks()
