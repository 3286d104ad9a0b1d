"""The store's test-only slow disk (`store/faults.py`) and how a refusing disk is named."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from fastsandbox.api.models import ObjectMeta, SandboxPool
from fastsandbox.errors import Unavailable
from fastsandbox.store import sqlite as sqlite_store
from fastsandbox.store.faults import DelayFile
from fastsandbox.store.sqlite import SqliteStore


class CountingDelay:
    def __init__(self) -> None:
        self.writes = 0

    async def before_write(self) -> None:
        self.writes += 1


def _pool(name: str) -> SandboxPool:
    return SandboxPool(metadata=ObjectMeta(name=name, namespace="default"))


async def test_the_store_waits_before_every_write_and_never_before_a_read(tmp_path: Path) -> None:
    delay = CountingDelay()
    store = await SqliteStore.open(tmp_path / "state.db", write_delay=delay)
    try:
        made = await store.create(_pool("a"))
        await store.get(SandboxPool, "default", "a")
        await store.list(SandboxPool)
        assert delay.writes == 1
        await store.update(made)
        assert delay.writes >= 1
    finally:
        await store.close()


async def test_a_held_store_writes_nothing_until_let_go(tmp_path: Path) -> None:
    flag = tmp_path / "delay"
    flag.write_text("hold\n")
    store = await SqliteStore.open(tmp_path / "state.db", write_delay=DelayFile(flag))
    try:
        write = asyncio.create_task(store.create(_pool("held")))
        await asyncio.sleep(0.3)
        assert not write.done()
        assert await store.list(SandboxPool) == []  # reads are not held
        flag.unlink()
        await asyncio.wait_for(write, 10)
        assert [p.metadata.name for p in await store.list(SandboxPool)] == ["held"]
    finally:
        await store.close()


async def test_an_unreadable_delay_is_no_delay(tmp_path: Path) -> None:
    flag = tmp_path / "delay"
    flag.write_text("soon\n")
    await asyncio.wait_for(DelayFile(flag).before_write(), 5)
    await asyncio.wait_for(DelayFile(tmp_path / "absent").before_write(), 5)


def test_a_read_only_disk_is_named_in_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite says only "disk I/O error" when the file system turned read-only.
    monkeypatch.setattr(sqlite_store.os, "access", lambda *_a, **_k: False)
    with pytest.raises(Unavailable) as caught, sqlite_store._translated(tmp_path / "state.db"):
        raise sqlite3.OperationalError("disk I/O error")
    assert "disk I/O error" in caught.value.message
    assert "read-only" in caught.value.message and str(tmp_path) in caught.value.message
