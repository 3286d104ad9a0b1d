"""A hung (SIGSTOP) and a slow (stopped and continued in turns) agent (issue 12), against a
real `fsb server`: calls to the hung agent end with a clear error within their timeout instead
of hanging, and nothing stalls on the other agent meanwhile: execs there work and new
sandboxes are placed there, both while the control plane has not yet noticed the hang and
after it has. Slow (stopped and continued in turns, 300 ms each, so it still heartbeats and
stays ready): execs on the other agent work, and creates placed while it is slow end with an
answer or a clear error, those on the other agent included. Durations are printed, never
asserted; the waits are liveness bounds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from tests.e2e._server import Server
from tests.fault.conftest import (
    agent_pid,
    drop_pool,
    make_pool,
    ready_agents,
    report,
    resume,
    settled_leaks,
    status,
    until,
)

pytestmark = pytest.mark.e2e

POOL = "hung"
BOUND = 90.0


def _timed(server: Server, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    got = server.fsb(*args, timeout=BOUND)
    return got, time.monotonic() - started


def _run(server: Server, name: str, image: str) -> subprocess.CompletedProcess[str]:
    return server.fsb(
        "run", name, "--image", image, "--pool", POOL, "--recovery-timeout", "600",
        "--", "sleep", "3600", timeout=BOUND,
    )  # fmt: skip


def test_a_hung_agent_stalls_nothing_elsewhere(server: Server, demo_image: str) -> None:
    make_pool(server, POOL, agents=2, per_agent=8)
    try:
        for name in ("on-a", "on-b"):
            assert _run(server, name, demo_image).returncode == 0
        a, b = status(server, "on-a")["assignedAgent"], status(server, "on-b")["assignedAgent"]
        assert a != b, "placement did not spread the two sandboxes"
        pid = agent_pid(server, a)
        os.kill(pid, signal.SIGSTOP)
        try:
            # At once, before any heartbeat missed: the other agent serves as before.
            exec_b, t_exec_b = _timed(server, "exec", "on-b", "--", "echo", "ok")
            assert exec_b.returncode == 0 and exec_b.stdout == "ok\n", exec_b.stderr
            # A call to the hung agent ends with an error, not a hang.
            exec_a, t_exec_a = _timed(server, "exec", "on-a", "--", "echo", "ok")
            assert exec_a.returncode != 0 and exec_a.stderr.strip(), exec_a
            until("the hung agent noticed", lambda: ready_agents(server, POOL) == 1, BOUND)
            placed = []
            for i in range(3):
                got, took = _timed(server, "run", f"new-{i}", "--image", demo_image, "--pool",
                                   POOL, "--", "sleep", "3600")  # fmt: skip
                assert got.returncode == 0, got.stderr
                assert status(server, f"new-{i}")["assignedAgent"] == b
                placed.append(took)
        finally:
            resume(pid)
        until("the agent back", lambda: ready_agents(server, POOL) == 2, BOUND)
        # Slow: stopped and continued in turns; the other agent still serves every call.
        # Creates go on meanwhile: placement onto either agent ends (an answer or an error
        # with a message), those placed on the other agent are not held up by the slow one.
        slow = _Slow(agent_pid(server, a))
        slow.start()
        slow_creates: dict[str, list[float]] = {a: [], b: []}
        try:
            for _ in range(3):
                got = server.fsb("exec", "on-b", "--", "echo", "ok", timeout=BOUND)
                assert got.returncode == 0, got.stderr
            slow_a, t_slow_a = _timed(server, "exec", "on-a", "--", "echo", "ok")
            assert slow_a.returncode == 0 or slow_a.stderr.strip(), slow_a
            for i in range(6):
                got, took = _timed(server, "run", f"slow-{i}", "--image", demo_image, "--pool",
                                   POOL, "--", "sleep", "3600")  # fmt: skip
                assert got.returncode == 0 or got.stderr.strip(), got
                if got.returncode == 0:
                    slow_creates[status(server, f"slow-{i}")["assignedAgent"]].append(took)
            assert slow_creates[b], "no create was placed on the other agent while one was slow"
        finally:
            slow.stop()
        inv, found = settled_leaks(server, (POOL,))
        report(
            "hung/slow agent", inv, found,
            exec_other_s=f"{t_exec_b:.2f}", exec_hung_error_s=f"{t_exec_a:.2f}",
            hung_error=repr(exec_a.stderr.strip()[:100]),
            creates_elsewhere_s=",".join(f"{t:.2f}" for t in placed),
            exec_slow_agent_s=f"{t_slow_a:.2f}", exec_slow_ok=slow_a.returncode == 0,
            creates_on_slow_s=",".join(f"{t:.2f}" for t in slow_creates[a]),
            creates_on_other_s=",".join(f"{t:.2f}" for t in slow_creates[b]),
        )  # fmt: skip
    finally:
        drop_pool(server, POOL)


class _Slow(threading.Thread):
    """SIGSTOP / SIGCONT an agent in turns (300 ms each) until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            os.kill(self.pid, signal.SIGSTOP)
            time.sleep(0.3)
            os.kill(self.pid, signal.SIGCONT)
            time.sleep(0.3)

    def stop(self) -> None:
        self._done.set()
        self.join(5)
        resume(self.pid)
