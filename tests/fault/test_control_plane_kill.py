"""kill -9 of the control plane during a mixed storm of creates, execs and deletes, `ROUNDS`
times (issue 12), against a real `fsb server`:

- every acknowledged create (not deleted since) is there after the restart and Running;
- every acknowledged delete stays gone (no resurrection, checked twice);
- no container, task, snapshot, shim or network namespace without a record, no Running record
  without its task, slot counts equal the sandboxes holding one, no endpoint owned twice
  (`tests/fault/_leaks.py`).

Operations whose reply never came (the server died under them) may have happened or not: only
the leak check constrains them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time

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

POOL = "storm"
WORKERS = 6


class Storm:
    def __init__(
        self, server: Server, image: str, round_no: int, kill_after: int, pool: str = POOL
    ) -> None:
        self.server = server
        self.pool = pool
        self.image = image
        self.round_no = round_no
        self.kill_after = kill_after
        self.acked: set[str] = set()
        self.deleted: set[str] = set()
        self.dying: set[str] = set()  # a delete was sent; its reply may not have come
        self.busy: dict[str, int] = {}  # execs in flight per sandbox
        self.execs = 0
        self.ops = 0
        self.killed = asyncio.Event()

    def _tick(self) -> None:
        self.ops += 1
        if self.ops == self.kill_after and not self.killed.is_set():
            assert self.server.proc is not None
            self.server.proc.send_signal(signal.SIGKILL)
            self.killed.set()

    async def worker(self, client: AsyncClient, w: int) -> None:
        rng = random.Random(self.round_no * 100 + w)
        k = 0
        while not self.killed.is_set():
            name = f"s{self.round_no}-{w}-{k}"
            k += 1
            try:
                await client.create(name, self.image, pool=self.pool, command=["sleep", "3600"])
                self.acked.add(name)
                self._tick()
                # Workers share the sandboxes; one a worker is using or deleting is off limits
                # to the others, so a NotFound here is a real loss, not two workers racing.
                target = rng.choice(sorted(self.acked - self.deleted - self.dying))
                self.busy[target] = self.busy.get(target, 0) + 1
                try:
                    got = await AsyncCommands(client, "default", target).run(
                        ["echo", name], timeout=30
                    )
                finally:
                    self.busy[target] -= 1
                assert got.stdout == f"{name}\n"
                self.execs += 1
                self._tick()
                idle = sorted(
                    n for n in self.acked - self.deleted - self.dying if not self.busy.get(n)
                )
                if idle and rng.random() < 0.5:
                    victim = rng.choice(idle)
                    self.dying.add(victim)
                    await client.delete(victim)
                    self.deleted.add(victim)
                    self._tick()
            except FsbError:
                if self.killed.is_set():
                    return  # the server died under this call: its outcome is unknown
                raise


async def _storm(server: Server, storm: Storm) -> None:
    async with sdk_client(server) as client:
        await asyncio.wait_for(
            asyncio.gather(*(storm.worker(client, w) for w in range(WORKERS))), 300
        )


def _exists(server: Server, name: str) -> bool:
    got = server.fsb("get", name)
    assert got.returncode in (0, 3), got.stderr
    return got.returncode == 0


async def _delete_all(server: Server, names: set[str]) -> None:
    async with sdk_client(server) as client:

        async def one(name: str) -> None:
            with contextlib.suppress(NotFound):
                await client.delete(name, wait=True)

        await asyncio.gather(*(one(n) for n in names))


def test_kill9_during_a_storm_loses_and_resurrects_nothing(server: Server, demo_image: str) -> None:
    make_pool(server, POOL, agents=2, per_agent=16)
    rng = random.Random(12)
    totals = {"acked_creates": 0, "acked_deletes": 0, "execs": 0, "restart_s": 0.0}
    try:
        for r in range(ROUNDS):
            storm = Storm(server, demo_image, r, kill_after=rng.randint(6, 18))
            asyncio.run(_storm(server, storm))
            assert storm.killed.is_set(), "the storm ended before the kill"
            server.stop()  # reap the killed process
            started = time.monotonic()
            server.start()
            totals["restart_s"] = max(totals["restart_s"], time.monotonic() - started)
            kept = storm.acked - storm.dying  # a delete without a reply may have happened
            for name in sorted(kept):
                until(
                    f"acknowledged {name} Running after the restart",
                    lambda n=name: server.fsb_json("get", n)["status"]["phase"] == "Running",
                    30,
                )
            for name in sorted(storm.deleted):
                until(f"deleted {name} gone", lambda n=name: not _exists(server, n), 60)
            inv, found = settled_leaks(server, (POOL,))
            report(
                f"control-plane kill -9 round {r + 1}/{ROUNDS}", inv, found,
                acked_creates=len(storm.acked), acked_deletes=len(storm.deleted),
                execs=storm.execs,
            )  # fmt: skip
            # No resurrection: the deleted stay deleted once the restarted plane converged.
            for name in sorted(storm.deleted):
                assert not _exists(server, name), f"deleted {name} came back"
            totals["acked_creates"] += len(storm.acked)
            totals["acked_deletes"] += len(storm.deleted)
            totals["execs"] += storm.execs
            present = {i["metadata"]["name"] for i in server.fsb_json("list")["items"]}
            asyncio.run(_delete_all(server, present))
        inv, found = settled_leaks(server, (POOL,))
        report("control-plane kill -9 total", inv, found, rounds=ROUNDS, **totals)
    finally:
        drop_pool(server, POOL)
