"""Lifecycle on both shapes (a real `fsb server`, and `fsb controller` replicas on a real
kube-apiserver): exits (incl. a real OOM kill), TTL expiry, agent loss by failure policy."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.e2e._kube_server import KubeServer
from tests.e2e._server import Server
from tests.e2e.conftest import AnyServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(shaped_server: AnyServer) -> AnyServer:
    return shaped_server


def wait_phase(server: AnyServer, name: str, phase: str, timeout: float) -> dict[str, Any]:
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
    server: AnyServer,
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
        # Freed while the record stays. The pool's status is rewritten by its next pass (every
        # 2 s), not at the exit itself, so allow one pass.
        deadline = time.monotonic() + 5
        while True:
            pool = server.fsb_json("pool", "get", "default-pool")
            if pool["status"]["slots"]["allocated"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert pool["status"]["slots"]["allocated"] == 0
        assert server.fsb_json("get", name)["status"]["phase"] == phase
    finally:
        assert server.fsb("delete", name, "--wait").returncode == 0


def test_an_exited_sandbox_keeps_its_log_but_not_its_container(
    server: AnyServer, demo_image: str
) -> None:
    made = server.fsb(
        "run", "bye", "--image", demo_image, "-o", "json", "--", "sh", "-c", "echo last-words"
    )
    assert made.returncode == 0, made.stderr
    cid = json.loads(made.stdout)["status"]["containerID"]
    try:
        wait_phase(server, "bye", "Succeeded", timeout=15)
        deadline = time.monotonic() + 15
        while cid in server.containers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cid not in server.containers()
        assert cid not in server.snapshots()
        logs = server.fsb("logs", "bye")
        assert logs.returncode == 0 and "last-words" in logs.stdout, logs
    finally:
        assert server.fsb("delete", "bye", "--wait").returncode == 0
    if isinstance(server, Server):
        assert not list((server.data_dir / "agents").glob(f"*/logs/{cid}.log*"))


def test_ttl_expiry_keeps_the_record(server: AnyServer, demo_image: str) -> None:
    made = server.fsb(
        "run", "short", "--image", demo_image, "--ttl", "3", "-o", "json", "--", "sleep", "3600"
    )
    assert made.returncode == 0, made.stderr
    cid = json.loads(made.stdout)["status"]["containerID"]
    # A generous deadline: how soon after the TTL the expiry lands is a number for benchmarks/
    # (on a loaded machine a few CLI round trips alone took longer than the 1.5 s once allowed
    # here); what is checked is that it happens, not early, and what it leaves.
    obj = wait_phase(server, "short", "Expired", timeout=60)
    status = obj["status"]
    ready = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["reason"] == "Expired"
    # Not early (a second's slack for a store that keeps whole seconds).
    expired_at, deadline = ready[0]["lastTransitionTime"], obj["spec"]["expireTime"]
    assert _instant(expired_at) >= _instant(deadline) - timedelta(seconds=1), (expired_at, deadline)
    assert not status.get("assignedAgent") and not status.get("containerID")
    assert cid not in server.containers()
    assert cid not in server.snapshots()
    # Without --wait, and yet gone at once: there is nothing left to stop.
    assert server.fsb("delete", "short").returncode == 0
    assert server.fsb("get", "short").returncode == 3


def _instant(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _agent_pid(server: AnyServer, agent: str) -> int:
    if isinstance(server, KubeServer):
        return server.agent_pid(agent)  # the agent Pod's process, run by the process kubelet
    state = json.loads((server.data_dir / "agents" / agent / "agent.json").read_text())
    pid: int = state["pid"]
    return pid


def _wait_pool(server: AnyServer, pool: str, ready: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = server.fsb("pool", "get", pool, "-o", "json")
        if got.returncode == 0 and json.loads(got.stdout)["status"]["agents"]["ready"] >= ready:
            return
        time.sleep(0.2)
    raise AssertionError(f"pool {pool} has not {ready} ready agents")


@pytest.mark.parametrize("policy", ["AutoRecreate", "Manual"])
def test_agent_loss_follows_the_failure_policy(
    server: AnyServer, demo_image: str, policy: str
) -> None:
    pool = f"loss-{policy.lower()}"
    assert (
        server.fsb("pool", "create", pool, *server.pool_args, "--min", "2", "--max", "2").returncode
        == 0
    )
    name = f"victim-{policy.lower()}"
    frozen: int | None = None
    try:
        _wait_pool(server, pool, 2)
        made = server.fsb(
            "run",
            name,
            "--image",
            demo_image,
            "--pool",
            pool,
            "--failure-policy",
            policy,
            "--recovery-timeout",
            "5",
            "-o",
            "json",
            "--",
            "sleep",
            "3600",
        )
        assert made.returncode == 0, made.stderr
        before = json.loads(made.stdout)["status"]
        # A hung agent: alive (so the fleet does not restart it) but not answering.
        frozen = _agent_pid(server, before["assignedAgent"])
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        deadline = stopped_at + 60  # liveness only (the 2 cores are shared); the rule is below
        obj: dict[str, Any] = {}
        while time.monotonic() < deadline:
            obj = server.fsb_json("get", name)
            moved = obj["status"].get("assignedAgent") != before["assignedAgent"]
            if (policy == "AutoRecreate" and moved and obj["status"]["phase"] == "Running") or (
                policy == "Manual" and obj["status"]["phase"] == "Lost"
            ):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{policy}: no action within 60 s: {obj.get('status')}")
        # Not before the recovery timeout: the status only changes after 5 s without heartbeats.
        assert time.monotonic() - stopped_at >= 5
        reachable = [c for c in obj["status"]["conditions"] if c["type"] == "AgentReachable"]
        if policy == "AutoRecreate":
            assert obj["status"]["containerID"] != before["containerID"]
        else:
            assert reachable and reachable[0]["status"] == "False"
            time.sleep(3)
            again = server.fsb_json("get", name)["status"]
            assert again["phase"] == "Lost"  # and stays so: never rescheduled by itself
            assert again["assignedAgent"] == before["assignedAgent"]
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        server.fsb("delete", name, "--wait")
        server.fsb("pool", "delete", pool)
