"""An agent that dies for good: its sandboxes follow their failure policy and the janitor
removes its containers, snapshots and logs once no record claims them (real `fsb server`,
containerd, runc).

How an agent is made to die for good: the local fleet restarts a crashed agent at once, with
the same name (that is the "agent comes back" case). So before the SIGKILL, the agent's state
directory is moved away and a plain file put in its place: every restart then fails (the fleet
cannot make the directory) and keeps failing, as for an agent whose machine is gone. The agent's
sandboxes are not killed with it: they belong to containerd's shims and go on running, which is
exactly what the janitor has to clean up.

- The AutoRecreate sandbox moves to the other agent after its recovery timeout; its old
  container, which no record claims any more, is removed after the orphan timeout.
- The Manual sandbox is `Lost` and its container stays while the record claims it (the user
  decides); once the user deletes the record (released without the dead agent's confirmation,
  after the recovery timeout), the janitor removes the container too.
- At the end the containers, snapshots and log files are what they were before.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._server import Server, new_server, purge

pytestmark = pytest.mark.e2e

POOL = "doomed"
RECOVERY = 5
ORPHAN_TIMEOUT = 2
SLEEP = ["--", "sleep", "3600"]


@pytest.fixture(scope="module")
def server(registry_addr: str) -> Iterator[Server]:
    srv = new_server(
        registry_addr, "--orphan-timeout", str(ORPHAN_TIMEOUT), "--janitor-interval", "1"
    )
    try:
        srv.start()
        yield srv
    finally:
        purge(srv)


def until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(every)


def pool_agents(server: Server) -> dict[str, Any]:
    got = server.fsb("pool", "get", POOL, "-o", "json")
    agents: dict[str, Any] = (
        json.loads(got.stdout)["status"]["agents"] if got.returncode == 0 else {}
    )
    return agents


def status(server: Server, name: str) -> dict[str, Any]:
    got: dict[str, Any] = server.fsb_json("get", name)["status"]
    return got


def active_snapshots(server: Server) -> set[str]:
    """Snapshots of containers (image layers are committed ones, and pulls add those)."""
    rows = [line.split() for line in server.ctr("snapshots", "ls").splitlines()[1:]]
    return {row[0] for row in rows if row and row[-1] == "Active"}


def log_files(server: Server) -> set[str]:
    return {p.name for p in (server.data_dir / "agents").glob("*/logs/*.log")}


def kill_for_good(server: Server, agent: str) -> Path:
    """SIGKILL the agent so that the fleet can never start it again; returns where its state
    directory (with its sandboxes' logs) went."""
    state_dir = server.data_dir / "agents" / agent
    pid = json.loads((state_dir / "agent.json").read_text())["pid"]
    moved = state_dir.with_name(f"{agent}.dead")
    os.rename(state_dir, moved)
    state_dir.write_text("not a directory: this agent cannot be restarted\n")
    os.kill(pid, signal.SIGKILL)
    return moved


def test_a_dead_agents_containers_are_removed_by_the_janitor(
    server: Server, demo_image: str
) -> None:
    containers_before = server.containers()
    snapshots_before = active_snapshots(server)
    logs_before = log_files(server)
    made = server.fsb(
        "pool", "create", POOL, *server.pool_args, "--min", "1", "--max", "1", "--per-agent", "4"
    )
    assert made.returncode == 0, made.stderr
    names = ("auto", "manual")
    try:
        until("one ready agent", lambda: pool_agents(server).get("ready") == 1, 60)
        created = {}
        for name, policy in zip(names, ("AutoRecreate", "Manual"), strict=True):
            result = server.fsb(
                "run", name, "--image", demo_image, "--pool", POOL,
                "--failure-policy", policy, "--recovery-timeout", str(RECOVERY),
                "-o", "json", *SLEEP,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            created[name] = json.loads(result.stdout)["status"]
        doomed = created["auto"]["assignedAgent"]
        assert created["manual"]["assignedAgent"] == doomed  # the pool had one agent
        old = {name: created[name]["containerID"] for name in names}
        assert set(old.values()) <= server.running_tasks()
        # A second agent for the AutoRecreate sandbox to move to.
        assert server.fsb("pool", "scale", POOL, "--min", "2", "--max", "2").returncode == 0
        until("two ready agents", lambda: pool_agents(server).get("ready") == 2, 60)

        moved_dir = kill_for_good(server, doomed)
        killed_at = time.monotonic()

        # AutoRecreate: a new container on the other agent, not before the recovery timeout.
        def rescheduled() -> dict[str, Any] | None:
            st = status(server, "auto")
            moved = st.get("assignedAgent") not in ("", doomed) and st["phase"] == "Running"
            return st if moved else None

        auto = until("auto rescheduled", rescheduled, 30)
        assert time.monotonic() - killed_at >= RECOVERY
        assert auto["containerID"] != old["auto"]
        assert auto["containerID"] in server.running_tasks()
        until("manual Lost", lambda: status(server, "manual")["phase"] == "Lost", 15)

        # The janitor removes the container no record claims any more, with its snapshot and
        # log; the sandboxes' processes kept running under containerd until then.
        until("auto's old container removed", lambda: old["auto"] not in server.containers(), 20)
        until("auto's old snapshot removed", lambda: old["auto"] not in server.snapshots(), 10)
        until(
            "auto's old log removed",
            lambda: not (moved_dir / "logs" / f"{old['auto']}.log").exists(),
            10,
        )
        removed_at = time.monotonic()
        # The Lost sandbox's record still claims its container: it stays (the user decides).
        while time.monotonic() - removed_at < ORPHAN_TIMEOUT + 3:
            assert old["manual"] in server.containers()
            assert status(server, "manual")["phase"] == "Lost"
            time.sleep(0.5)
        # The agent never came back.
        assert pool_agents(server).get("ready") == 1
        assert moved_dir.is_dir() and not (server.data_dir / "agents" / doomed).is_dir()

        # The user deletes it: released without the dead agent's confirmation, and then the
        # janitor removes the container.
        gone = server.fsb("delete", "manual", "--wait")
        assert gone.returncode == 0, gone.stderr
        assert server.fsb("get", "manual").returncode == 3
        until("manual's container removed", lambda: old["manual"] not in server.containers(), 20)
        until("manual's snapshot removed", lambda: old["manual"] not in server.snapshots(), 10)
        until(
            "manual's log removed",
            lambda: not (moved_dir / "logs" / f"{old['manual']}.log").exists(),
            10,
        )

        # What happened is on record for `fsb describe`.
        events = server.fsb_json("describe", "auto")["events"]
        reasons = [e["reason"] for e in events]
        assert reasons[:2] == ["Scheduled", "Started"]
        for wanted in ("AgentUnreachable", "AgentLost", "Rescheduled"):
            assert wanted in reasons, reasons
        assert reasons[-2:] == ["Scheduled", "Started"]

        assert server.containers() == containers_before | {auto["containerID"]}
        assert active_snapshots(server) == snapshots_before | {auto["containerID"]}
        assert server.fsb("delete", "auto", "--wait").returncode == 0
        assert server.containers() == containers_before
        assert active_snapshots(server) == snapshots_before
        until("logs back to before", lambda: log_files(server) == logs_before, 15)
        # No slot leaked (the pool's status is written by its next pass).
        until(
            "no slot allocated",
            lambda: server.fsb_json("pool", "get", POOL)["status"]["slots"]["allocated"] == 0,
            10,
        )
    finally:
        for name in names:
            server.fsb("delete", name, "--wait")
        server.fsb("pool", "delete", POOL)
