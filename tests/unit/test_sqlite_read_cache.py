"""The SQLite store's in-memory bodies never answer a get with anything but the stored state:
after every write, a failed write, a delete, and reads racing writes (real SQLite file)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fastsandbox.api.models import Sandbox
from fastsandbox.errors import Conflict, NotFound
from fastsandbox.store import sqlite as sqlite_store
from fastsandbox.store.sqlite import SqliteStore


def _sandbox(name: str) -> Sandbox:
    return Sandbox.model_validate(
        {
            "apiVersion": "fastsandbox.io/v1alpha1",
            "kind": "Sandbox",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"image": "busybox", "poolRef": "p", "command": ["sleep", "1"]},
        }
    )


async def _on_disk(path: Path, name: str) -> Sandbox | None:
    """The row as a fresh store (nothing cached) reads it from the file."""
    fresh = await SqliteStore.open(path)
    try:
        return await fresh.get(Sandbox, "default", name)
    except NotFound:
        return None
    finally:
        await fresh.close()


async def test_gets_follow_every_write(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStore.open(path)
    try:
        with pytest.raises(NotFound):
            await store.get(Sandbox, "default", "a")  # remembered as absent...
        made = await store.create(_sandbox("a"))  # ...until it is created
        got = await store.get(Sandbox, "default", "a")
        assert got.metadata.resource_version == made.metadata.resource_version
        got.metadata.labels["x"] = "1"
        updated = await store.update(got)
        again = await store.get(Sandbox, "default", "a")
        assert again.metadata.labels == {"x": "1"}
        assert again.metadata.resource_version == updated.metadata.resource_version
        # A write refused (stale resourceVersion) leaves the stored state, and so the get.
        stale = got.model_copy(deep=True)
        stale.metadata.labels["x"] = "2"
        with pytest.raises(Conflict):
            await store.update(stale)
        assert (await store.get(Sandbox, "default", "a")).metadata.labels == {"x": "1"}
        assert (await store.delete(Sandbox, "default", "a")) is None
        with pytest.raises(NotFound):
            await store.get(Sandbox, "default", "a")
    finally:
        await store.close()
    assert await _on_disk(path, "a") is None


async def test_reads_racing_writes_end_on_the_stored_state(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStore.open(path)
    try:
        names = [f"s{i}" for i in range(5)]
        for name in names:
            await store.create(_sandbox(name))

        async def writer(name: str) -> None:
            for i in range(20):
                current = await store.get(Sandbox, "default", name)
                current.metadata.labels["n"] = str(i)
                await store.update(current)

        async def reader(name: str) -> None:
            for _ in range(60):
                await store.get(Sandbox, "default", name)
                await asyncio.sleep(0)

        # Few cache entries: reads miss (and fill) all the time while writes commit.
        sqlite_store.BODY_CACHE, saved = 3, sqlite_store.BODY_CACHE
        try:
            await asyncio.gather(*(f(n) for n in names for f in (writer, reader, reader)))
        finally:
            sqlite_store.BODY_CACHE = saved
        for name in names:
            cached = await store.get(Sandbox, "default", name)
            assert cached.metadata.labels == {"n": "19"}
            disk = await _on_disk(path, name)
            assert disk is not None
            assert cached.metadata.resource_version == disk.metadata.resource_version
    finally:
        await store.close()


async def test_a_read_overtaken_by_a_commit_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await SqliteStore.open(tmp_path / "state.db")
    try:
        made = await store.create(_sandbox("a"))
        store._bodies.clear()
        read_done, go_on = asyncio.Event(), asyncio.Event()
        real_rows = store._rows

        async def slow_rows(conn: object, sql: str, params: object) -> object:
            rows = await real_rows(conn, sql, params)  # type: ignore[arg-type]
            if sql.startswith("SELECT body FROM objects") and not read_done.is_set():
                read_done.set()  # only the first read is held: the update's own goes on
                await go_on.wait()  # the row read is now the old one
            return rows

        monkeypatch.setattr(store, "_rows", slow_rows)
        old_read = asyncio.create_task(store.get(Sandbox, "default", "a"))
        await read_done.wait()
        made.metadata.labels["x"] = "new"
        await store.update(made)
        go_on.set()
        assert (await old_read).metadata.labels == {}  # what it read, before the commit
        assert (await store.get(Sandbox, "default", "a")).metadata.labels == {"x": "new"}
    finally:
        await store.close()
