"""kill -9 of agents, `ROUNDS` times (issue 12), against a real `fsb server`.

Each round: a pool of two agents runs AutoRecreate and Manual sandboxes; an interactive exec
(`fsb exec -i ... cat`) and a file upload (`fsb cp` from a pipe that is still being written)
run on the victim agent when it is `kill -9`ed; the agent is kept from restarting past the
recovery timeout (its state directory is moved away, as in tests/e2e/test_dead_agent_janitor.py),
then allowed back. Checked:

- the exec and the upload end with a non-zero exit and an error message, not a hang;
- the victim's AutoRecreate sandboxes run again on the other agent (new container), its Manual
  ones are Lost, then Running on their kept container once the agent is back;
- the returning agent's superseded copies are stopped (fencing), and nothing leaks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.e2e._server import FSB, Server
from tests.fault.conftest import (
    ROUNDS,
    agent_pid,
    drop_pool,
    make_pool,
    ready_agents,
    report,
    settled_leaks,
    status,
    until,
)

pytestmark = pytest.mark.e2e

POOL = "akill"
RECOVERY = 3
BOUND = 60.0


def test_agent_kill9_rounds(server: Server, demo_image: str) -> None:
    make_pool(server, POOL, agents=2, per_agent=6)
    figures = {"auto_rescheduled": 0, "manual_lost": 0, "calls_failed_cleanly": 0}
    try:
        for r in range(ROUNDS):
            _one_round(server, demo_image, r, figures)
            inv, found = settled_leaks(server, (POOL,))
            report(f"agent kill -9 round {r + 1}/{ROUNDS}", inv, found, **figures)
            for item in server.fsb_json("list")["items"]:
                server.fsb("delete", item["metadata"]["name"], "--wait")
        inv, found = settled_leaks(server, (POOL,))
        report("agent kill -9 total", inv, found, rounds=ROUNDS, **figures)
    finally:
        drop_pool(server, POOL)


def _run(server: Server, name: str, image: str, policy: str) -> dict[str, str]:
    made = server.fsb(
        "run", name, "--image", image, "--pool", POOL, "--failure-policy", policy,
        "--recovery-timeout", str(RECOVERY), "--", "sleep", "3600",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return status(server, name)


def _produce(fifo: Path, stop: threading.Event) -> None:
    try:
        with open(fifo, "wb") as out:
            while not stop.is_set():
                out.write(b"x" * 16384)
                out.flush()
                time.sleep(0.05)
    except OSError:
        pass  # the reader (fsb cp) is gone


def _one_round(server: Server, image: str, r: int, figures: dict[str, int]) -> None:
    # A, M, M, A: whether placement spreads or packs, one agent hosts both policies.
    policies = ("AutoRecreate", "Manual", "Manual", "AutoRecreate")
    made = {}
    for i, policy in enumerate(policies):
        name = f"{policy[0].lower()}{r}-{i}"
        made[name] = _run(server, name, image, policy)
    hosts: dict[str, set[str]] = {}
    for name, st in made.items():
        hosts.setdefault(st["assignedAgent"], set()).add(name[0])
    victim = next(agent for agent, kinds in hosts.items() if kinds == {"a", "m"})
    on_victim = {n: st for n, st in made.items() if st["assignedAgent"] == victim}
    target = next(n for n in on_victim if n.startswith("m"))
    fifo_dir = Path(tempfile.mkdtemp(prefix="fsb-fault-"))
    fifo = fifo_dir / "upload"
    os.mkfifo(fifo)
    execing = subprocess.Popen(
        [FSB, "exec", "-i", target, "--", "cat"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=server.env,
    )  # fmt: skip
    upload = subprocess.Popen(
        [FSB, "cp", str(fifo), f"{target}:/tmp/upload"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server.env,
    )  # fmt: skip
    # A slow producer: the upload keeps sending while its agent dies.
    stop_writing = threading.Event()
    writer = threading.Thread(target=_produce, args=(fifo, stop_writing), daemon=True)
    writer.start()
    state_dir = server.data_dir / "agents" / victim
    moved = state_dir.with_name(f"{victim}.away")
    try:
        assert execing.stdin is not None and execing.stdout is not None
        execing.stdin.write(b"before\n")
        execing.stdin.flush()
        assert execing.stdout.readline() == b"before\n"
        # Keep the fleet from restarting it until the recovery timeout has passed.
        pid = agent_pid(server, victim)
        os.rename(state_dir, moved)
        state_dir.write_text("away: this agent cannot restart yet\n")
        os.kill(pid, signal.SIGKILL)
        for proc, what in ((execing, "exec -i"), (upload, "cp")):
            try:
                code = proc.wait(timeout=BOUND)  # an error, not a hang
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{what} hung after its agent's kill -9") from None
            err = proc.stderr.read().decode() if proc.stderr else ""
            assert code != 0, f"{what} claimed success although its agent died"
            assert err.strip(), f"{what} failed without a message"
            figures["calls_failed_cleanly"] += 1
        for name, st in on_victim.items():
            if name.startswith("a"):
                until(
                    f"{name} Running on the other agent",
                    lambda n=name: (
                        (s := status(server, n))["phase"] == "Running"
                        and s["assignedAgent"] not in ("", victim)
                    ),
                    BOUND,
                )
                assert status(server, name)["containerID"] != st["containerID"]
                figures["auto_rescheduled"] += 1
            else:
                until(f"{name} Lost", lambda n=name: status(server, n)["phase"] == "Lost", BOUND)
                figures["manual_lost"] += 1
    finally:
        stop_writing.set()
        with contextlib.suppress(OSError):  # unblock a writer still waiting for a reader
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(10)
        for proc in (execing, upload):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        shutil.rmtree(fifo_dir, ignore_errors=True)
        if moved.exists():
            state_dir.unlink(missing_ok=True)
            os.rename(moved, state_dir)
    # The agent is back: Manual sandboxes run again on their kept containers; the AutoRecreate
    # ones' old copies were stopped by its first heartbeat.
    until("the victim back", lambda: ready_agents(server, POOL) == 2, BOUND)
    for name, st in on_victim.items():
        if name.startswith("m"):
            until(
                f"{name} Running again",
                lambda n=name: status(server, n)["phase"] == "Running",
                BOUND,
            )
            assert status(server, name)["containerID"] == st["containerID"]
        else:
            assert st["containerID"] not in server.running_tasks()
