"""Fixtures of the fsb-supervisor black-box tests: the binary built from the working tree, and a
`sandbox` (the binary as a plain child process, idle, dialling a fake agent in a temp dir)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.unit.supervisor_agent import BOUND, FakeAgent

REPO = Path(__file__).resolve().parents[2]
SANDBOX_ID = "sbx-test-1"
PATH_ENV = f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}"


@pytest.fixture(scope="session")
def supervisor_bin() -> Path:
    """Built from the working tree (scripts/build-native is a no-op when nothing changed)."""
    cargo = Path.home() / ".cargo" / "bin" / "cargo"
    if shutil.which("cargo") is None and not cargo.exists():
        pytest.skip("no cargo to build native/supervisor (scripts/setup installs one)")
    result = subprocess.run(
        [str(REPO / "scripts" / "build-native")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    path = REPO / "native" / "bin" / "fsb-supervisor"
    assert str(path) in result.stdout.split()
    return path


@dataclass
class Sandbox:
    agent: FakeAgent
    proc: subprocess.Popen[bytes]
    dir: Path
    secret: bytes
    log: Path


async def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def start_supervisor(
    binary: Path, channel: Path, secret_hex: str, log: Path, *argv: str
) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "FSB_CHANNEL": str(channel),
        "FSB_SUPERVISOR_SECRET": secret_hex,
        "FSB_SANDBOX_ID": SANDBOX_ID,
        "FSB_OTHER": "scrubbed too",
    }
    with log.open("ab") as err:
        return subprocess.Popen(
            [str(binary), *(["--", *argv] if argv else [])],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM: idle, the supervisor kills the process groups it started, then exits 0."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
async def sandbox(supervisor_bin: Path, tmp_path: Path) -> AsyncIterator[Sandbox]:
    channel = tmp_path / "run"
    channel.mkdir()
    secret = secrets.token_bytes(32)
    agent = await FakeAgent(channel, secret).start()
    log = tmp_path / "supervisor.log"
    proc = start_supervisor(supervisor_bin, channel, secret.hex(), log)
    sb = Sandbox(agent, proc, tmp_path, secret, log)
    try:
        yield sb
    finally:
        stop(proc)
        await sb.agent.stop()  # a test may have replaced the agent (a restart)


def err(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["ok"] is False, reply
    error: dict[str, Any] = reply["error"]
    return error
