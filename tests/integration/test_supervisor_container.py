"""fsb-supervisor as the real PID 1 of a runc container (started with plain `ctr run`, so this
pins the binary, not the agent's wiring): the channel directory bind-mounted read-only at
/.fsb/run, the host-side fake agent (tests/unit/supervisor_agent.py) listening in it.

It proves what a plain-process test cannot: the supervisor is PID 1 in its own PID namespace,
dials out through a read-only mount (under gVisor too, with runsc's --host-uds=open), sandbox
code cannot read the secret from PID 1's environment, and the channel comes back after the agent
restarts while processes keep running.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.infra import ContainerdProc, missing_requirements
from tests.unit.supervisor_agent import BOUND, DATA, EOF, FakeAgent

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CID = "sup-it"


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[tuple[Path, bytes, FakeAgent]]:
    chan = tmp_path / "run"
    chan.mkdir()
    secret = secrets.token_bytes(32)
    agent = await FakeAgent(chan, secret).start()
    try:
        yield chan, secret, agent
    finally:
        await agent.stop()


def build() -> Path:
    result = subprocess.run(
        [str(REPO / "scripts" / "build-native")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return REPO / "native" / "bin" / "fsb-supervisor"


def runc_binary(runtime: str, tmp_path: Path) -> list[str]:
    """ctr's `--runc-binary` for gVisor: runsc through the runc shim (as the agent runs it),
    allowed to connect to host unix sockets (PROTOCOL.md: the supervisor dials out)."""
    if runtime == "runc":
        return []
    if (why := missing_requirements(gvisor=True)) is not None:
        pytest.skip(why)
    wrapper = tmp_path / "runsc-wrapper"
    runsc = shutil.which("runsc")
    wrapper.write_text(f'#!/bin/sh\nexec {runsc} --network=host --host-uds=open "$@"\n')
    wrapper.chmod(0o755)
    return ["--runc-binary", str(wrapper)]


@pytest.mark.parametrize("runtime", ["runc", "gvisor"])
async def test_supervisor_is_pid1_serves_its_agent_and_survives_an_agent_restart(
    containerd: ContainerdProc,
    demo_image: str,
    cgroup_parent: str,
    channel: tuple[Path, bytes, FakeAgent],
    tmp_path: Path,
    runtime: str,
) -> None:
    chan, secret, agent = channel
    binary = build()
    extra = runc_binary(runtime, tmp_path)
    containerd.ctr("images", "pull", "--plain-http", demo_image)
    containerd.ctr(
        "run", "-d", *extra,
        "--cgroup", f"{cgroup_parent}/{CID}",
        "--mount", f"type=bind,src={binary},dst=/.fsb/init,options=rbind:ro",
        "--mount", f"type=bind,src={chan},dst=/.fsb/run,options=rbind:ro",
        "--env", "FSB_CHANNEL=/.fsb/run",
        "--env", f"FSB_SUPERVISOR_SECRET={secret.hex()}",
        "--env", f"FSB_SANDBOX_ID={CID}",
        demo_image, CID, "/.fsb/init",
    )  # fmt: skip
    try:
        await agent.wait_control()
        assert agent.hellos[0]["pid"] == 1 and agent.hellos[0]["sandbox"] == CID

        env = ["PATH=/bin:/usr/bin"]
        out = await agent.run(["sh", "-c", "echo $$ $PPID; cat /proc/1/environ"], env=env)
        pid, ppid = out.stdout.split()[:2]
        assert ppid == b"1" and pid != b"1"
        # The secret's value never shows (wiped in place); under runc the file is refused
        # altogether (not dumpable), gVisor's kernel does not apply that check to environ.
        assert secret.hex().encode() not in out.stdout
        if runtime == "runc":
            assert out.exit["code"] != 0 and b"environ" in out.stderr

        tty = await agent.run(["tty"], env=env, pty={"cols": 80, "rows": 24})
        assert tty.stdout.startswith(b"/dev/pts/") and tty.exit["code"] == 0

        written = await agent.stream("write", path="/tmp/x/hello.txt", mode=0o600)
        conn = written[1]
        assert conn is not None
        conn.send(DATA, b"inside")
        conn.send(EOF)
        assert (await conn.read_json())["entry"]["mode"] == 0o600
        cat = await agent.run(["cat", "/tmp/x/hello.txt"], env=env)
        assert cat.stdout == b"inside"

        reply, conn = await agent.stream("exec", argv=["cat"], env=env)
        assert conn is not None
        await agent.stop()
        restarted = await FakeAgent(chan, secret).start()
        try:
            await restarted.wait_control()  # redialled through the read-only mount
            procs = (await restarted.request("ps"))["processes"]
            assert [p["running"] for p in procs if p["pid"] == reply["pid"]] == [True]
            _, again = await restarted.stream("attach", pid=reply["pid"])
            assert again is not None
            again.send(DATA, b"still here")
            again.send(EOF)
            assert (await again.collect()).stdout == b"still here"
        finally:
            await restarted.stop()

        containerd.ctr("tasks", "kill", "-s", "SIGTERM", CID)
        deadline = time.monotonic() + BOUND
        while "STOPPED" not in containerd.ctr("tasks", "ls"):
            assert time.monotonic() < deadline, "an idle supervisor did not stop on SIGTERM"
            await asyncio.sleep(0.05)
    finally:
        containerd.remove_all_containers()
