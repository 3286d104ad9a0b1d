"""`fsb describe` against a real `fsb server` (containerd + runc, SQLite): a sandbox that exits,
one whose TTL expires and one that is reset each show their events in order, with timestamps,
in the table and in `-o json|yaml`; the events live in the server's store."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from tests.e2e._server import Server, new_server, purge

pytestmark = pytest.mark.e2e

SLEEP = ["--", "sleep", "3600"]
AGE = re.compile(r"^\d+[smhd]( \(x\d+\))?$")


@pytest.fixture(scope="module")
def server(registry_addr: str) -> Iterator[Server]:
    srv = new_server(registry_addr)
    try:
        srv.start()
        yield srv
    finally:
        purge(srv)


def wait_for(server: Server, name: str, done: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        result = server.fsb("get", name, "-o", "json")
        if result.returncode == 0:
            obj = json.loads(result.stdout)
            if done(obj):
                return obj
        time.sleep(0.2)
    raise AssertionError(f"{name}: not there within {timeout}s: {obj.get('status')}")


def described(server: Server, name: str, *reasons: str, timeout: float = 10) -> dict[str, Any]:
    """`fsb describe -o json` once its events are `reasons` (events are written just after
    what they describe)."""
    deadline = time.monotonic() + timeout
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        data = server.fsb_json("describe", name)
        if [e["reason"] for e in data["events"]] == list(reasons):
            return data
        time.sleep(0.2)
    raise AssertionError(f"{name}: events {[e['reason'] for e in data['events']]}, not {reasons}")


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def event_rows(text: str) -> list[list[str]]:
    """The Events table of `fsb describe`: [AGE, TYPE, REASON, MESSAGE] per row."""
    lines = text.splitlines()
    table = lines[lines.index("Events:") + 1 :]
    header = table[0]
    assert header.split() == ["AGE", "TYPE", "REASON", "MESSAGE"]
    starts = [header.index(col) for col in ("AGE", "TYPE", "REASON", "MESSAGE")]
    rows = []
    for line in table[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(cells)
    return rows


def check_events(server: Server, name: str, data: dict[str, Any], since: datetime) -> None:
    """The table lists the JSON's events, in the same order; timestamps are UTC, in order,
    and within the test."""
    events = data["events"]
    stamps = [parse(e["timestamp"]) for e in events]
    assert all(s.utcoffset() == timedelta(0) for s in stamps)
    assert stamps == sorted(stamps)
    assert since - timedelta(seconds=1) <= stamps[0] and stamps[-1] <= datetime.now(UTC)
    uid = data["object"]["metadata"]["uid"]
    assert all(e["uid"] == uid and e["kind"] == "Sandbox" for e in events)

    result = server.fsb("describe", name)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for section in ("Spec:", "Status:", "Conditions:", "Events:"):
        assert section in text.splitlines()
    assert text.splitlines()[0].split() == ["Name:", name]
    rows = event_rows(text)
    assert [(r[1], r[2]) for r in rows] == [(e["type"], e["reason"]) for e in events]
    assert all(AGE.match(r[0]) for r in rows), rows
    assert [r[3] for r in rows] == [e["message"] for e in events]

    as_yaml = server.fsb("describe", name, "-o", "yaml")
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert yaml.safe_load(as_yaml.stdout)["events"] == events


def test_exit_ttl_and_reset_show_their_events_in_order(server: Server, demo_image: str) -> None:
    since = datetime.now(UTC)
    names = ("exits", "expires", "resets")
    try:
        made = server.fsb("run", "exits", "--image", demo_image, "--", "sh", "-c", "exit 3")
        assert made.returncode == 0, made.stderr
        made = server.fsb("run", "expires", "--image", demo_image, "--ttl", "2", *SLEEP)
        assert made.returncode == 0, made.stderr
        made = server.fsb("run", "resets", "--image", demo_image, "-o", "json", *SLEEP)
        assert made.returncode == 0, made.stderr
        first_container = json.loads(made.stdout)["status"]["containerID"]
        revision = server.fsb_json("reset", "resets")["spec"]["resetRevision"]

        wait_for(server, "exits", lambda o: o["status"]["phase"] == "Failed", timeout=15)
        data = described(server, "exits", "Scheduled", "Started", "Exited")
        exited = data["events"][-1]
        assert exited["type"] == "Warning" and "code 3" in exited["message"]
        assert data["object"]["status"]["exitCode"] == 3
        check_events(server, "exits", data, since)

        wait_for(server, "expires", lambda o: o["status"]["phase"] == "Expired", timeout=10)
        data = described(server, "expires", "Scheduled", "Started", "Expired")
        assert "expireTime" in data["events"][-1]["message"]
        check_events(server, "expires", data, since)

        wait_for(
            server,
            "resets",
            lambda o: o["status"].get("observedResetRevision") == revision,
            timeout=15,
        )
        data = described(server, "resets", "Scheduled", "Started", "Reset", "Scheduled", "Started")
        reset, started = data["events"][2], data["events"][4]
        assert first_container in reset["message"] and revision in reset["message"]
        assert data["object"]["status"]["containerID"] in started["message"]
        check_events(server, "resets", data, since)

        # An update is recorded too, after everything else.
        assert server.fsb("update", "resets", "--label", "team=ml").returncode == 0
        data = described(
            server, "resets", "Scheduled", "Started", "Reset", "Scheduled", "Started", "Updated"
        )
        assert "team=ml" in data["events"][-1]["message"]
    finally:
        for name in names:
            server.fsb("delete", name, "--wait")


def test_describe_errors_and_a_deleted_sandbox(server: Server, demo_image: str) -> None:
    missing = server.fsb("describe", "no-such-sandbox")
    assert missing.returncode == 3
    assert missing.stderr.startswith("error: ") and "no-such-sandbox" in missing.stderr
    assert server.fsb("get", "no-such-sandbox").returncode == missing.returncode

    made = server.fsb("run", "again", "--image", demo_image, *SLEEP)
    assert made.returncode == 0, made.stderr
    try:
        described(server, "again", "Scheduled", "Started")
        assert server.fsb("delete", "again", "--wait").returncode == 0
        assert server.fsb("describe", "again").returncode == 3
        # A new sandbox of the same name starts with its own events only.
        made = server.fsb("run", "again", "--image", demo_image, *SLEEP)
        assert made.returncode == 0, made.stderr
        data = described(server, "again", "Scheduled", "Started")
        assert data["events"][0]["uid"] == data["object"]["metadata"]["uid"]
    finally:
        server.fsb("delete", "again", "--wait")
