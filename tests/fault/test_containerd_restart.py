"""containerd restarted under load (issue 12), against a real `fsb server` with its own
containerd: sandboxes that were running survive (same container, same process, exec works),
calls made during the outage fail with a clear message (an `FsbError` naming what is wrong,
never a hang) and succeed again once containerd is back, without anyone restarting the server
or the agents, and nothing leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import Counter

import pytest

from fastsandbox.errors import FsbError, NotFound
from fastsandbox.sdk import AsyncClient
from fastsandbox.sdk.commands import AsyncCommands
from tests.e2e._server import Server
from tests.fault.conftest import (
    ROUNDS,
    drop_pool,
    make_pool,
    report,
    sdk_client,
    settled_leaks,
    until,
)

pytestmark = pytest.mark.e2e

POOL = "ctdr"
BOUND = 60.0


def _restart_containerd(server: Server) -> None:
    home = server.data_dir / "containerd"
    pid = int((home / "containerd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    until("containerd stopped", lambda: not _alive(pid), 30, 0.05)
    proc = subprocess.Popen(
        ["containerd", "--config", str(home / "config.toml")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # The server stops the containerd of this pid file on a clean shutdown; this thread reaps it
    # then (no zombie, and no "still running" warning when the Popen object is collected).
    (home / "containerd.pid").write_text(f"{proc.pid}\n")
    threading.Thread(target=proc.wait, name="reap-containerd", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as file:
            stat = file.read()
    except OSError:
        return False
    return stat.split(")")[-1].split()[0] != "Z"


class Load:
    def __init__(self, survivors: list[str], image: str) -> None:
        self.survivors = survivors
        self.image = image
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.messages: list[str] = []
        self.stop = asyncio.Event()
        self.made: set[str] = set()

    async def run(self, client: AsyncClient) -> None:
        k = 0
        while not self.stop.is_set():
            k += 1
            try:
                target = self.survivors[k % len(self.survivors)]
                got = await AsyncCommands(client, "default", target).run(["echo", "hi"], timeout=20)
                assert got.stdout == "hi\n"
                name = f"load-{k}"
                await client.create(name, self.image, pool=POOL, command=["sleep", "3600"])
                self.made.add(name)
                await client.delete(name, wait=True)
                self.made.discard(name)
                self.ok += 1
            except FsbError as exc:
                self.errors[type(exc).__name__] += 1
                self.messages.append(exc.message)
                await asyncio.sleep(0.2)


async def _round(server: Server, image: str, survivors: list[str]) -> Load:
    load = Load(survivors, image)
    async with sdk_client(server) as client:
        task = asyncio.create_task(load.run(client))
        await asyncio.sleep(2)
        await asyncio.to_thread(_restart_containerd, server)
        restarted = time.monotonic()
        ok_at_restart = load.ok
        # Service resumes by itself: full exec/create/delete cycles succeed again (two, so at
        # least one began after the restart).
        while load.ok < ok_at_restart + 2:
            assert time.monotonic() - restarted < BOUND, load.messages[-5:]
            await asyncio.sleep(0.2)
        load.stop.set()
        await asyncio.wait_for(task, BOUND)
        for name in list(load.made):  # a create whose reply was an error may still exist
            with contextlib.suppress(NotFound):
                await client.delete(name, wait=True)
    return load


def test_running_sandboxes_survive_a_containerd_restart(server: Server, demo_image: str) -> None:
    make_pool(server, POOL, agents=2, per_agent=6)
    survivors = [f"keep-{i}" for i in range(3)]
    try:
        before = {}
        for name in survivors:
            made = server.fsb(
                "run", name, "--image", demo_image, "--pool", POOL, "--", "sleep", "3600"
            )
            assert made.returncode == 0, made.stderr
            before[name] = server.fsb_json("get", name)["status"]["containerID"]
        totals: Counter[str] = Counter()
        for r in range(ROUNDS):
            load = asyncio.run(_round(server, demo_image, survivors))
            totals.update(load.errors)
            for message in load.messages:
                assert message.strip(), "an error without a message"
            for name in survivors:
                st = server.fsb_json("get", name)["status"]
                assert st["phase"] == "Running" and st["containerID"] == before[name]
            assert set(before.values()) <= server.running_tasks()
            inv, found = settled_leaks(server, (POOL,))
            report(
                f"containerd restart round {r + 1}/{ROUNDS}", inv, found,
                cycles_ok=load.ok, errors=dict(load.errors),
                sample=repr(load.messages[0][:120]) if load.messages else "-",
            )  # fmt: skip
    finally:
        drop_pool(server, POOL)
