"""One suite, every `ObjectStore` backend: the event half of `fastsandbox.store.base`.

Events are a side record for `fsb describe`: kept per object, merged when they repeat, dropped
with their object, never watched. The `env` fixture opens each backend; a new backend adds a
param and a branch in `_open` (it may need other fixtures: use `request.getfixturevalue`) and
may hand out its own namespace.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import aiosqlite
import pytest

from fastsandbox.api.models import Event, Sandbox, SandboxPool
from fastsandbox.errors import InvalidArgument, Unavailable
from fastsandbox.store.base import MAX_EVENTS_PER_OBJECT, EventBatches, EventType, ObjectStore
from fastsandbox.store.memory import MemoryStore
from fastsandbox.store.sqlite import SqliteStore

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@dataclass
class Env:
    store: ObjectStore
    namespace: str
    events_move_resource_version: bool = False
    """True on Kubernetes: an Event is an etcd write, so the store-wide version moves (a watch
    of our kinds still sees nothing)."""


async def _open(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Env:
    if backend == "memory":
        return Env(MemoryStore(bookmark_interval=0.05), "default")
    if backend == "sqlite":
        return Env(await SqliteStore.open(tmp_path / "state.db", bookmark_interval=0.05), "default")
    if backend == "kubernetes":
        from fastsandbox.store.kubernetes import KubernetesStore

        api = request.getfixturevalue("kube_crds")
        namespace = request.getfixturevalue("kube_namespace")
        store = await KubernetesStore.open(api.kubeconfig, bookmark_interval=0.05)
        return Env(store, namespace, events_move_resource_version=True)
    raise AssertionError(f"unknown backend {backend}")


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("kubernetes", marks=pytest.mark.kubernetes)]
)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    opened = await _open(request.param, request, tmp_path)
    try:
        yield opened
    finally:
        await opened.store.close()


def sandbox(name: str, namespace: str) -> Sandbox:
    return Sandbox.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"image": "busybox", "poolRef": "default-pool"},
        }
    )


def event(
    obj: Sandbox | SandboxPool,
    reason: str,
    message: str = "",
    *,
    at: float = 0.0,
    type_: str = "Normal",
    uid: str | None = None,
) -> Event:
    meta = obj.metadata
    return Event.model_validate(
        {
            "kind": obj.kind,
            "namespace": meta.namespace,
            "name": meta.name,
            "uid": meta.uid if uid is None else uid,
            "type": type_,
            "reason": reason,
            "message": message,
            "timestamp": T0 + timedelta(seconds=at),
        }
    )


async def events_of(env: Env, obj: Sandbox | SandboxPool, limit: int = 1000) -> list[Event]:
    return await env.store.list_events(obj.kind, obj.metadata.namespace, obj.metadata.name, limit)


def reasons(events: list[Event]) -> list[str]:
    return [e.reason for e in events]


async def test_an_event_round_trips(env: Env) -> None:
    sb = await env.store.create(sandbox("a", env.namespace))
    # Whole seconds: core/v1 Event timestamps (Kubernetes) keep no more.
    sent = event(sb, "Exited", "exit code 3 (Error)", at=1, type_="Warning")
    await env.store.record_event(sent)
    [got] = await events_of(env, sb)
    assert got == sent
    assert got.timestamp == T0 + timedelta(seconds=1)
    assert got.timestamp.utcoffset() == timedelta(0)


async def test_timestamps_are_kept_in_utc(env: Env) -> None:
    sb = await env.store.create(sandbox("tz", env.namespace))
    local = datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    await env.store.record_event(event(sb, "Started").model_copy(update={"timestamp": local}))
    [got] = await events_of(env, sb)
    assert got.timestamp == T0 and got.timestamp.tzinfo == UTC


async def test_oldest_first_and_limit_keeps_the_most_recent(env: Env) -> None:
    sb = await env.store.create(sandbox("b", env.namespace))
    for i, reason in enumerate(["Scheduled", "Started", "Exited", "Reset", "Started"]):
        await env.store.record_event(event(sb, reason, f"#{i}", at=i))
    assert reasons(await events_of(env, sb)) == [
        "Scheduled",
        "Started",
        "Exited",
        "Reset",
        "Started",
    ]
    assert [e.message for e in await events_of(env, sb, limit=2)] == ["#3", "#4"]


async def test_a_repeat_of_the_latest_event_is_counted_not_added(env: Env) -> None:
    sb = await env.store.create(sandbox("c", env.namespace))
    await env.store.record_event(event(sb, "Unschedulable", "no free slot", at=0, type_="Warning"))
    await env.store.record_event(event(sb, "Unschedulable", "no free slot", at=2, type_="Warning"))
    three = event(sb, "Unschedulable", "no free slot", at=4, type_="Warning")
    await env.store.record_event(three.model_copy(update={"count": 3}))
    [got] = await events_of(env, sb)
    assert got.count == 5
    assert got.timestamp == T0 + timedelta(seconds=4)  # the latest occurrence


async def test_only_consecutive_identical_events_merge(env: Env) -> None:
    sb = await env.store.create(sandbox("d", env.namespace))
    for i, (reason, message) in enumerate(
        [
            ("Started", "x"),
            ("Started", "y"),  # another message
            ("Exited", "y"),
            ("Started", "y"),  # repeats an older event, not the latest
        ]
    ):
        await env.store.record_event(event(sb, reason, message, at=i))
    await env.store.record_event(event(sb, "Started", "y", at=9, type_="Warning"))  # other type
    got = await events_of(env, sb)
    assert [(e.reason, e.message, e.type, e.count) for e in got] == [
        ("Started", "x", "Normal", 1),
        ("Started", "y", "Normal", 1),
        ("Exited", "y", "Normal", 1),
        ("Started", "y", "Normal", 1),
        ("Started", "y", "Warning", 1),
    ]


async def test_a_batch_is_kept_as_its_events_one_by_one(env: Env) -> None:
    store = env.store
    if not isinstance(store, EventBatches):
        pytest.skip("this backend takes events one by one")  # the recorder sends them so
    sb = await store.create(sandbox("batch", env.namespace))
    other = await store.create(sandbox("batch2", env.namespace))
    ghost = sandbox("batch-ghost", env.namespace)
    await store.record_events(
        [
            event(sb, "Scheduled", "a1", at=0),
            event(other, "Scheduled", "a2", at=0),
            event(ghost, "Started", uid="no-such-uid"),  # dropped, the rest kept
            event(sb, "Started", "x", at=1),
            event(sb, "Started", "x", at=2),  # a repeat inside the batch is counted
        ]
    )
    got = await events_of(env, sb)
    assert [(e.reason, e.count) for e in got] == [("Scheduled", 1), ("Started", 2)]
    assert got[1].timestamp == T0 + timedelta(seconds=2)
    assert reasons(await events_of(env, other)) == ["Scheduled"]
    assert await events_of(env, ghost) == []
    with pytest.raises(InvalidArgument):
        await store.record_events([event(sb, "Started").model_copy(update={"kind": "Pod"})])


async def test_events_of_a_missing_or_earlier_object_are_dropped(env: Env) -> None:
    ghost = sandbox("ghost", env.namespace)
    await env.store.record_event(event(ghost, "Started", uid="no-such-uid"))  # no error
    assert await events_of(env, ghost) == []

    sb = await env.store.create(sandbox("e", env.namespace))
    await env.store.record_event(event(sb, "Started", uid="an-earlier-object"))
    assert await events_of(env, sb) == []
    await env.store.record_event(event(sb, "Started", uid=""))  # no uid: whoever has the name
    assert reasons(await events_of(env, sb)) == ["Started"]


async def test_removing_the_object_drops_its_events(env: Env) -> None:
    sb = await env.store.create(sandbox("f", env.namespace))
    other = await env.store.create(sandbox("g", env.namespace))
    await env.store.record_event(event(sb, "Started"))
    await env.store.record_event(event(other, "Started"))
    assert await env.store.delete(Sandbox, env.namespace, "f") is None
    again = await env.store.create(sandbox("f", env.namespace))
    assert await events_of(env, again) == []
    assert reasons(await events_of(env, other)) == ["Started"]


async def test_an_object_being_deleted_keeps_recording(env: Env) -> None:
    held = sandbox("h", env.namespace)
    held.metadata.finalizers = ["fastsandbox.io/cleanup"]
    sb = await env.store.create(held)
    marked = await env.store.delete(Sandbox, env.namespace, "h")
    assert marked is not None and marked.metadata.deletion_timestamp is not None
    await env.store.record_event(event(marked, "Deleting", "stopping the container"))
    assert reasons(await events_of(env, sb)) == ["Deleting"]
    marked.metadata.finalizers = []
    await env.store.update(marked)  # the last finalizer goes: the object and its events go
    assert await events_of(env, sb) == []


async def test_each_object_keeps_a_bounded_number(env: Env) -> None:
    sb = await env.store.create(sandbox("i", env.namespace))
    total = MAX_EVENTS_PER_OBJECT + 5
    for i in range(total):
        await env.store.record_event(event(sb, "Started", f"#{i}", at=i))
    got = await events_of(env, sb, limit=10 * total)
    assert len(got) <= MAX_EVENTS_PER_OBJECT
    assert got[-1].message == f"#{total - 1}"
    assert "#0" not in {e.message for e in got}


async def test_kinds_and_namespaces_are_separate(env: Env) -> None:
    sb = await env.store.create(sandbox("same", env.namespace))
    pool = await env.store.create(
        SandboxPool.model_validate({"metadata": {"name": "same", "namespace": env.namespace}})
    )
    await env.store.record_event(event(sb, "Started"))
    await env.store.record_event(event(pool, "AgentStarted"))
    assert reasons(await events_of(env, sb)) == ["Started"]
    assert reasons(await events_of(env, pool)) == ["AgentStarted"]
    assert await env.store.list_events("Sandbox", "elsewhere", "same") == []


async def test_events_take_no_resource_version_and_are_not_watched(env: Env) -> None:
    sb = await env.store.create(sandbox("j", env.namespace))
    before = await env.store.current_resource_version()
    watch = env.store.watch(Sandbox, before)
    try:
        await env.store.record_event(event(sb, "Started"))
        if not env.events_move_resource_version:
            assert await env.store.current_resource_version() == before
        async with asyncio.timeout(5):
            seen = await anext(watch)
        assert seen.type is EventType.BOOKMARK
        assert seen.resource_version == before
    finally:
        await watch.aclose()
    assert (await env.store.get(Sandbox, env.namespace, "j")).metadata.resource_version == before


async def test_bad_requests_are_invalid(env: Env) -> None:
    sb = await env.store.create(sandbox("k", env.namespace))
    with pytest.raises(InvalidArgument):
        await env.store.list_events("Pod", env.namespace, "k")
    with pytest.raises(InvalidArgument):
        await env.store.list_events("Sandbox", env.namespace, "k", limit=0)
    with pytest.raises(InvalidArgument):
        await env.store.record_event(event(sb, "Started").model_copy(update={"kind": "Pod"}))


async def test_a_closed_store_is_unavailable(env: Env) -> None:
    sb = await env.store.create(sandbox("l", env.namespace))
    await env.store.close()
    with pytest.raises(Unavailable):
        await env.store.record_event(event(sb, "Started"))
    with pytest.raises(Unavailable):
        await events_of(env, sb)


# -- SQLite only: the file ----------------------------------------------------------------------
async def test_sqlite_events_survive_a_restart_and_old_files_get_the_table(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStore.open(path)
    sb = await store.create(sandbox("m", "default"))
    await store.close()
    # A file written before events existed (schema version 1).
    async with aiosqlite.connect(path) as db:
        await db.execute("DROP TABLE object_events")
        await db.execute("PRAGMA user_version = 1")
        await db.commit()
    store = await SqliteStore.open(path)
    try:
        await store.record_event(event(sb, "Started", at=1))
    finally:
        await store.close()
    store = await SqliteStore.open(path)
    try:
        assert reasons(await store.list_events("Sandbox", "default", "m")) == ["Started"]
    finally:
        await store.close()
