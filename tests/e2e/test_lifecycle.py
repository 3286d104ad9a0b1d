"""Lifecycle against a real `fsb server`: exits (incl. a real OOM kill), TTL expiry."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e._server import Server, new_server, purge

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(registry_addr: str) -> Iterator[Server]:
    srv = new_server(registry_addr)
    try:
        srv.start()
        yield srv
    finally:
        purge(srv)


def wait_phase(server: Server, name: str, phase: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        result = server.fsb("get", name, "-o", "json")
        if result.returncode == 0:
            obj = json.loads(result.stdout)
            if obj["status"]["phase"] == phase:
                return obj
        time.sleep(0.1)
    raise AssertionError(f"{name} not {phase} within {timeout}s: {obj.get('status')}")


@pytest.mark.parametrize(
    ("name", "argv", "extra", "phase", "code", "reason"),
    [
        ("exit-0", ["true"], [], "Succeeded", 0, "Completed"),
        ("exit-3", ["sh", "-c", "exit 3"], [], "Failed", 3, "Error"),
        (
            "oom",
            ["dd", "if=/dev/zero", "of=/dev/shm/fill", "bs=1M", "count=60"],
            ["--memory", "16Mi"],
            "Failed",
            137,
            "OOMKilled",
        ),
    ],
)
def test_exit_is_detected_and_the_slot_freed(
    server: Server,
    demo_image: str,
    name: str,
    argv: list[str],
    extra: list[str],
    phase: str,
    code: int,
    reason: str,
) -> None:
    made = server.fsb("run", name, "--image", demo_image, *extra, "--", *argv)
    assert made.returncode == 0, made.stderr
    try:
        obj = wait_phase(server, name, phase, timeout=15)
        assert obj["status"]["exitCode"] == code
        ready = [c for c in obj["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["reason"] == reason
        pool = server.fsb_json("pool", "get", "default-pool")
        assert pool["status"]["slots"]["allocated"] == 0  # freed while the record stays
    finally:
        assert server.fsb("delete", name, "--wait").returncode == 0


def test_ttl_expiry_keeps_the_record(server: Server, demo_image: str) -> None:
    made = server.fsb(
        "run", "short", "--image", demo_image, "--ttl", "3", "-o", "json", "--", "sleep", "3600"
    )
    assert made.returncode == 0, made.stderr
    cid = json.loads(made.stdout)["status"]["containerID"]
    obj = wait_phase(server, "short", "Expired", timeout=4.5)
    status = obj["status"]
    assert not status.get("assignedAgent") and not status.get("containerID")
    assert cid not in server.containers()
    assert cid not in server.snapshots()
    # Without --wait, and yet gone at once: there is nothing left to stop.
    assert server.fsb("delete", "short").returncode == 0
    assert server.fsb("get", "short").returncode == 3
