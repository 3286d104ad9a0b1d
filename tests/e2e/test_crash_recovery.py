"""kill -9 of the server in the middle of a burst of creates, then a restart: every acknowledged
create is there and Running, every container has a record, and slot counts match reality."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time

import pytest

from fastsandbox.errors import FsbError
from fastsandbox.sdk import AsyncClient
from tests.e2e._server import Server, new_server, purge

pytestmark = pytest.mark.e2e

BURST = 50


async def burst(server: Server, image: str, acked: list[str]) -> None:
    async with AsyncClient(endpoint=server.endpoint, namespace="default") as client:

        async def one(i: int) -> None:
            name = f"burst-{i:02d}"
            try:
                await client.create(name, image, pool="burst", command=["sleep", "3600"])
            except FsbError:
                return  # the server died under it: not acknowledged
            acked.append(name)
            if len(acked) == 15:
                assert server.proc is not None
                server.proc.send_signal(signal.SIGKILL)

        await asyncio.gather(*(one(i) for i in range(BURST)))


def test_kill9_during_a_burst_loses_no_acknowledged_create(
    registry_addr: str, demo_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = new_server(registry_addr)
    try:
        srv.start()
        made = srv.fsb(
            "pool",
            "create",
            "burst",
            *srv.pool_args,
            "--min",
            "1",
            "--max",
            "1",
            "--per-agent",
            "60",
        )
        assert made.returncode == 0, made.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = srv.fsb("pool", "get", "burst", "-o", "json")
            if got.returncode == 0 and json.loads(got.stdout)["status"]["agents"]["ready"]:
                break
            time.sleep(0.2)
        acked: list[str] = []
        # The SDK finds the server's token through FSB_DATA_DIR; monkeypatch puts it back after
        # this test, so later tests do not talk to a server that is gone.
        monkeypatch.setenv("FSB_DATA_DIR", str(srv.data_dir))
        asyncio.run(burst(srv, demo_image, acked))
        assert 15 <= len(acked) < BURST, "the kill did not land mid-burst"
        srv.stop()  # reap the killed process
        srv.start()

        items = srv.fsb_json("list")["items"]
        records = {i["metadata"]["name"]: i for i in items}
        for name in acked:
            assert name in records, f"acknowledged {name} was lost"
            assert records[name]["status"]["phase"] == "Running", json.dumps(
                records[name]["status"]
            )
        recorded = {i["status"]["containerID"] for i in items if i["status"].get("containerID")}
        # Containers the agent had started for requests whose reply never came were adopted
        # from the request they carry; none is left without a record.
        # A create still in flight at the agent when the server died finishes by itself.
        deadline = time.monotonic() + 10
        while (tasks := srv.running_tasks()) != recorded and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tasks == recorded, json.dumps(
            {
                "records_without_task": [
                    i["status"] for i in items if i["status"].get("containerID") not in tasks
                ],
                "tasks_without_record": sorted(tasks - recorded),
            }
        )
        pool = srv.fsb_json("pool", "get", "burst")
        running = sum(1 for i in items if i["status"]["phase"] == "Running")
        assert pool["status"]["slots"]["allocated"] == running
    finally:
        purge(srv)


def test_fast_create_answered_then_kill9_before_its_record_write_survives(
    registry_addr: str, demo_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fast mode answers before the record is written. Holding SQLite's write lock from here
    keeps the server's record write waiting (it retries), so the kill -9 lands, for certain,
    after the answer and before the write: the restarted server must rebuild the record from
    the request label on the container."""
    srv = new_server(registry_addr)
    try:
        srv.start()
        made = srv.fsb("pool", "create", "held", "--min", "1", "--max", "1", "--per-agent", "4")
        assert made.returncode == 0, made.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = srv.fsb("pool", "get", "held", "-o", "json")
            if got.returncode == 0 and json.loads(got.stdout)["status"]["agents"]["ready"]:
                break
            time.sleep(0.2)
        monkeypatch.setenv("FSB_DATA_DIR", str(srv.data_dir))

        async def create() -> tuple[str, str]:
            async with AsyncClient(endpoint=srv.endpoint, namespace="default") as client:
                made = await client.create(
                    "held-1", demo_image, pool="held", command=["sleep", "3600"], mode="fast"
                )
                assert made.phase == "Running"
                # Not stored yet, but served: a get right after the create finds it.
                got = await client.get("held-1")
                assert got.status.container_id == made.container_id
                return made.uid, made.container_id

        lock = sqlite3.connect(srv.data_dir / "state.db", timeout=10, isolation_level=None)
        try:
            lock.execute("BEGIN IMMEDIATE")
            uid, container_id = asyncio.run(create())
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGKILL)
            srv.stop()  # reap the killed process
            lock.execute("ROLLBACK")
        finally:
            lock.close()
        srv.start()
        record = srv.fsb_json("get", "held-1")
        assert record["metadata"]["uid"] == uid
        assert record["status"]["phase"] == "Running", json.dumps(record["status"])
        assert record["status"]["containerID"] == container_id
        assert container_id in srv.running_tasks()
    finally:
        purge(srv)
