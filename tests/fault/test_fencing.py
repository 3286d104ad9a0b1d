"""Fencing (issue 12): an agent hung (SIGSTOP) past its sandbox's recovery timeout, whose
AutoRecreate sandbox was started again on another agent, comes back still running the old
copy. The first heartbeat that reaches it stops that copy before the agent counts as ready.

Checked by causality through the runtime, not by timing: the janitor's orphan timeout is 10
minutes on this server, so the old task can only be stopped by the heartbeat; and once the
pool reports the returning agent ready again, containerd no longer runs the old task (the pool
status is read before the tasks). The overlap since SIGCONT is printed (one heartbeat interval
is 1 s here).
"""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime

import pytest

from tests.e2e._server import Server
from tests.fault.conftest import (
    ROUNDS,
    agent_pid,
    drop_pool,
    make_pool,
    read_log,
    ready_agents,
    report,
    resume,
    settled_leaks,
    status,
    until,
)

pytestmark = pytest.mark.e2e

POOL = "fence"
RECOVERY = 3
SUPERSEDED = "stopped a superseded container on an agent that came back"


def test_a_returning_agent_stops_its_superseded_copy(server: Server, demo_image: str) -> None:
    make_pool(server, POOL, agents=2, per_agent=4)
    overlaps: list[float] = []
    try:
        for i in range(ROUNDS):
            overlaps.append(_one_round(server, demo_image, f"fenced-{i}"))
        inv, found = settled_leaks(server, (POOL,))
        worst = max(overlaps)
        report(
            "fencing", inv, found, rounds=ROUNDS,
            overlap_after_return_s=",".join(f"{o:.2f}" for o in overlaps),
            worst_s=f"{worst:.2f}",
        )  # fmt: skip
    finally:
        drop_pool(server, POOL)


def _stopped_at(server: Server, sandbox_id: str) -> float:
    """Wall time the server logged stopping the superseded container."""
    for rec in read_log(server):
        if rec.get("event") == SUPERSEDED and rec.get("sandbox_id") == sandbox_id:
            return datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
    raise AssertionError(f"the server never logged stopping {sandbox_id}")


def _one_round(server: Server, image: str, name: str) -> float:
    made = server.fsb(
        "run", name, "--image", image, "--pool", POOL, "--failure-policy", "AutoRecreate",
        "--recovery-timeout", str(RECOVERY), "-o", "json", "--", "sleep", "3600",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    first = status(server, name)
    hung, old = first["assignedAgent"], first["containerID"]
    pid = agent_pid(server, hung)
    os.kill(pid, signal.SIGSTOP)
    try:
        moved = until(
            "rescheduled on the other agent",
            lambda: (
                (st := status(server, name))["phase"] == "Running"
                and st["assignedAgent"] not in ("", hung)
                and st
            ),
            60,
        )
        # While the agent is hung its containers run on under their shims: that copy is the
        # one to fence.
        assert old in server.running_tasks()
        assert moved["containerID"] in server.running_tasks()
    finally:
        back_wall = time.time()
        resume(pid)
    back = time.monotonic()

    def old_gone_once_ready() -> bool:
        ready = ready_agents(server, POOL) == 2  # read before the tasks
        tasks = server.running_tasks()
        if ready:
            assert old not in tasks, "the agent counted as ready while its old copy still ran"
        return ready and old not in tasks

    until("the returning agent ready with its old copy stopped", old_gone_once_ready, 60, 0.05)
    observed = time.monotonic() - back
    overlap = _stopped_at(server, old) - back_wall
    print(
        f"\n{name}: old copy stopped {overlap:.2f} s after SIGCONT (server log), "
        f"seen stopped and agent ready by the test {observed:.2f} s after"
    )
    assert old not in server.containers(), "the superseded container was not removed"
    final = status(server, name)
    assert final["phase"] == "Running" and final["containerID"] == moved["containerID"]
    assert server.fsb("delete", name, "--wait").returncode == 0
    return overlap
