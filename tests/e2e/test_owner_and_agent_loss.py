"""What survives whom (issue 9, "done when"), against a real `fsb server`:

- a sandbox created with `lease=5` lives while its owner (a separate Python process using the
  SDK) renews it, and is deleted once the owner is `kill -9`ed — a crashed trainer leaks nothing;
- an agent `kill -9`ed during a running `fsb exec -i` loses no sandbox: the exec ends with an
  error (not a hang), the sandbox keeps running, and a new exec works once the agent is back.

Durations are printed, never asserted; the waits are generous liveness bounds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e._server import FSB, Server, new_server, purge

pytestmark = pytest.mark.e2e

BOUND = 90.0


@pytest.fixture(scope="module")
def server(registry_addr: str) -> Iterator[Server]:
    srv = new_server(registry_addr)
    try:
        srv.start()
        yield srv
    finally:
        purge(srv)


def _token(server: Server) -> str:
    return (server.data_dir / "token").read_text().strip()


def _phase(server: Server, name: str) -> str | None:
    got = server.fsb("get", name, "-o", "json")
    if got.returncode == 3:
        return None
    assert got.returncode == 0, got.stderr
    phase: str = json.loads(got.stdout)["status"]["phase"]
    return phase


def test_a_leased_sandbox_dies_with_its_owner(server: Server, demo_image: str) -> None:
    name = f"leased-{os.getpid()}"
    owner = textwrap.dedent(
        f"""
        import time
        from fastsandbox import Sandbox
        sb = Sandbox.create(image={demo_image!r}, name={name!r}, lease=5,
                            endpoint={server.endpoint!r}, token={_token(server)!r})
        print("created", flush=True)
        time.sleep(3600)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", owner],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FSB_CA_FILE": str(server.ca_file)},
    ) as proc:
        try:
            _outlive_the_owner(server, name, proc)
        finally:
            if proc.poll() is None:
                proc.kill()
            server.fsb("delete", name, "--wait")


def _outlive_the_owner(server: Server, name: str, proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "created", proc.stderr.read() if proc.stderr else ""
    # Three lease periods: only the owner's renewals keep it alive this long.
    time.sleep(15)
    assert _phase(server, name) == "Running"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    deadline = killed + BOUND
    while _phase(server, name) is not None:
        assert time.monotonic() < deadline, "the sandbox outlived its owner's lease"
        time.sleep(0.25)
    print(f"\nleased sandbox gone {time.monotonic() - killed:.1f} s after its owner's kill -9")


def _agent_pid(server: Server, agent: str) -> int:
    out = subprocess.run(["pgrep", "-f", "--", f"--name={agent}"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split() if int(p) != os.getpid()]
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"agent" in b" ".join(cmdline) and str(server.data_dir).encode() in b" ".join(cmdline):
            return pid
    raise AssertionError(f"no process for agent {agent} among {pids}")


def test_an_agent_killed_during_exec_loses_no_sandbox(server: Server, demo_image: str) -> None:
    name = f"survivor-{os.getpid()}"
    made = server.fsb("run", name, "--image", demo_image)
    assert made.returncode == 0, made.stderr
    try:
        obj = json.loads(server.fsb("get", name, "-o", "json").stdout)
        agent = obj["status"]["assignedAgent"]
        container = obj["status"]["containerID"]
        # An interactive exec that runs until its stdin closes.
        with subprocess.Popen(
            [FSB, "exec", "-i", name, "--", "cat"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=server.env,
        ) as execing:  # fmt: skip
            assert execing.stdin is not None and execing.stdout is not None
            execing.stdin.write(b"before\n")
            execing.stdin.flush()
            assert execing.stdout.readline() == b"before\n"
            os.kill(_agent_pid(server, agent), signal.SIGKILL)
            killed = time.monotonic()
            try:
                code = execing.wait(timeout=BOUND)  # an error, not a hang
            finally:
                if execing.poll() is None:
                    execing.kill()
        assert code != 0, "the exec claimed success although its agent died under it"
        # The sandbox never stopped: same container, Running, and exec works again once the
        # fleet has restarted the agent.
        deadline = killed + BOUND
        while True:
            again = server.fsb("exec", name, "--", "echo", "after")
            if again.returncode == 0:
                break
            assert time.monotonic() < deadline, f"no exec after the agent restart: {again.stderr}"
            time.sleep(0.25)
        print(f"\nexec works again {time.monotonic() - killed:.1f} s after the agent's kill -9")
        assert again.stdout == "after\n"
        obj = json.loads(server.fsb("get", name, "-o", "json").stdout)
        assert obj["status"]["phase"] == "Running"
        assert obj["status"]["containerID"] == container
    finally:
        server.fsb("delete", name, "--wait")
