"""One suite, every `ObjectStore` backend: the semantics of `fastsandbox.store.base`.

The in-memory fake, SQLite (a real file in tmp_path) and Kubernetes (our CRDs on a real
kube-apiserver, `tests/k8s_fixtures.py`; marked `kubernetes`) must pass the same tests, so unit
tests that use the fake prove something about the real stores too. No mocks anywhere.

Where a backend cannot keep a rule for a reason outside our control, `Capabilities` says so and
the test checks what that backend does instead; every other assertion holds for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastsandbox.api.models import Sandbox, SandboxPhase, SandboxPool
from fastsandbox.errors import AlreadyExists, Conflict, NotFound, Unavailable
from fastsandbox.store.base import BatchCreates, EventType, ObjectStore, WatchEvent
from fastsandbox.store.memory import MemoryStore
from fastsandbox.store.sqlite import SqliteStore
from tests.infra import cannot_run

HISTORY = 20
BOOKMARK_INTERVAL = 0.05
# Namespaces the suite writes to; the Kubernetes backend creates them.
NAMESPACES = ("default", "other")

Opener = Callable[[], Awaitable[ObjectStore]]


@dataclass(frozen=True)
class Capabilities:
    keeps_given_uid: bool = True
    """False on Kubernetes: the apiserver always assigns metadata.uid on create."""
    dense_resource_versions: bool = True
    """One resourceVersion per change of ours. False on Kubernetes: versions are etcd revisions
    shared with every other resource of the cluster (they still strictly increase)."""


CAPABILITIES = {
    "memory": Capabilities(),
    "sqlite": Capabilities(),
    "kubernetes": Capabilities(keeps_given_uid=False, dense_resource_versions=False),
}


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("kubernetes", marks=pytest.mark.kubernetes)]
)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def caps(backend: str) -> Capabilities:
    return CAPABILITIES[backend]


@pytest.fixture
async def store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ObjectStore]:
    opened: ObjectStore
    if backend == "memory":
        opened = MemoryStore(history=HISTORY, bookmark_interval=BOOKMARK_INTERVAL)
    elif backend == "sqlite":
        opened = await SqliteStore.open(
            tmp_path / "state.db", history=HISTORY, bookmark_interval=BOOKMARK_INTERVAL
        )
    else:
        opened = await _open_kubernetes(request)
    try:
        yield opened
    finally:
        await opened.close()
        if backend == "kubernetes":
            _reset_kubernetes(request)


async def _open_kubernetes(request: pytest.FixtureRequest) -> ObjectStore:
    # Imported here: the memory/SQLite params must not need the Kubernetes tier at all.
    from fastsandbox.store.kubernetes import KubernetesStore

    api = request.getfixturevalue("kube_crds")
    # The suite lists across all namespaces, so each test starts from a cluster without any of
    # our objects (the apiserver is the session's: earlier tests may have left some).
    _reset_kubernetes(request)
    return await KubernetesStore.open(api.kubeconfig, bookmark_interval=BOOKMARK_INTERVAL)


def _reset_kubernetes(request: pytest.FixtureRequest) -> None:
    from lightkube import ApiError
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace

    from fastsandbox._kube.resources import SandboxPoolResource, SandboxResource
    from tests.k8s_fixtures import remove_all

    admin = request.getfixturevalue("kube_admin")
    for res in (SandboxResource, SandboxPoolResource):
        remove_all(admin, res, None)
    for name in NAMESPACES:
        try:
            admin.create(Namespace(metadata=ObjectMeta(name=name)))
        except ApiError as exc:
            if exc.status.code != 409:
                raise


def sandbox(
    name: str, namespace: str = "default", labels: dict[str, str] | None = None, **spec: Any
) -> Sandbox:
    return Sandbox.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"image": "busybox", "poolRef": "default-pool", **spec},
        }
    )


def pool(name: str, namespace: str = "default") -> SandboxPool:
    return SandboxPool.model_validate({"metadata": {"name": name, "namespace": namespace}})


def rv(obj: Sandbox | SandboxPool) -> int:
    return int(obj.metadata.resource_version)


async def next_change(events: AsyncIterator[WatchEvent]) -> WatchEvent:
    """The next non-BOOKMARK event (the suite's bookmark interval is short)."""
    async with asyncio.timeout(5):
        while True:
            event = await anext(events)
            if event.type is not EventType.BOOKMARK:
                return event


def describe(event: WatchEvent) -> tuple[EventType, str]:
    assert event.object is not None
    return event.type, event.object.metadata.name


# -- create / get / list ---------------------------------------------------------------------
async def test_create_assigns_identity_and_version(store: ObjectStore, caps: Capabilities) -> None:
    before = int(await store.current_resource_version())
    created = await store.create(sandbox("a"))
    assert created.metadata.uid
    assert created.metadata.creation_timestamp is not None
    assert created.metadata.deletion_timestamp is None
    assert created.metadata.generation == 1
    assert rv(created) > before
    assert await store.current_resource_version() == created.metadata.resource_version
    fetched = await store.get(Sandbox, "default", "a")
    assert fetched == created

    given = sandbox("b")
    given.metadata.uid = "my-uid"
    uid = (await store.create(given)).metadata.uid
    if caps.keeps_given_uid:
        assert uid == "my-uid"
    else:
        assert uid and uid not in ("my-uid", created.metadata.uid)


async def test_resource_versions_strictly_increase(store: ObjectStore) -> None:
    seen = [rv(await store.create(sandbox(f"s{i}"))) for i in range(3)]
    obj = await store.get(Sandbox, "default", "s0")
    obj.metadata.labels["x"] = "1"
    obj = await store.update(obj)
    seen.append(rv(obj))
    obj.status.phase = SandboxPhase.RUNNING
    seen.append(rv(await store.update_status(obj)))
    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen)


async def test_objects_handed_out_are_copies(store: ObjectStore) -> None:
    given = sandbox("a", labels={"k": "v"})
    created = await store.create(given)
    given.metadata.labels["k"] = "changed-input"
    created.metadata.labels["k"] = "changed-output"
    fetched = await store.get(Sandbox, "default", "a")
    fetched.spec.command.append("changed")
    again = await store.get(Sandbox, "default", "a")
    assert again.metadata.labels == {"k": "v"}
    assert again.spec.command == []


async def test_create_existing_key_is_already_exists(store: ObjectStore) -> None:
    await store.create(sandbox("a"))
    with pytest.raises(AlreadyExists, match="a"):
        await store.create(sandbox("a"))
    # The key is (kind, namespace, name): other namespaces and kinds are free.
    await store.create(sandbox("a", namespace="other"))
    await store.create(pool("a"))


async def test_create_many_is_each_create_in_one_write(store: ObjectStore) -> None:
    if not isinstance(store, BatchCreates):
        pytest.skip("this backend creates one by one")  # SandboxService then sends them so
    await store.create(sandbox("taken"))
    since = await store.current_resource_version()
    out = await store.create_many(
        [sandbox("m1"), sandbox("taken"), sandbox("m2"), sandbox("m1"), sandbox("m3")]
    )
    assert [type(o).__name__ for o in out] == [
        "Sandbox", "AlreadyExists", "Sandbox", "AlreadyExists", "Sandbox",
    ]  # fmt: skip
    made = [o for o in out if isinstance(o, Sandbox)]
    assert [rv(o) for o in made] == [int(since) + 1, int(since) + 2, int(since) + 3]
    assert await store.current_resource_version() == made[-1].metadata.resource_version
    for obj in made:
        assert obj.metadata.uid and obj.metadata.generation == 1
        assert await store.get(Sandbox, "default", obj.metadata.name) == obj
    async with contextlib.aclosing(store.watch(Sandbox, since)) as events:
        seen = [describe(await next_change(events)) for _ in made]
    assert seen == [(EventType.ADDED, "m1"), (EventType.ADDED, "m2"), (EventType.ADDED, "m3")]
    assert await store.create_many([]) == []


async def test_missing_objects_are_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFound, match="Sandbox default/nope"):
        await store.get(Sandbox, "default", "nope")
    with pytest.raises(NotFound):
        await store.delete(Sandbox, "default", "nope")
    with pytest.raises(NotFound):
        await store.update(sandbox("nope"))
    with pytest.raises(NotFound):
        await store.update_status(sandbox("nope"))
    await store.create(pool("only-a-pool"))
    with pytest.raises(NotFound):
        await store.get(Sandbox, "default", "only-a-pool")


async def test_list_by_namespace_all_namespaces_and_labels(store: ObjectStore) -> None:
    await store.create(sandbox("b", labels={"team": "x", "tier": "1"}))
    await store.create(sandbox("a", labels={"team": "y"}))
    await store.create(sandbox("c", namespace="other", labels={"team": "x"}))
    await store.create(pool("default-pool"))

    names = [s.metadata.name for s in await store.list(Sandbox, "default")]
    assert names == ["a", "b"]
    everywhere = await store.list(Sandbox)
    assert sorted((s.metadata.namespace, s.metadata.name) for s in everywhere) == [
        ("default", "a"),
        ("default", "b"),
        ("other", "c"),
    ]
    team_x = await store.list(Sandbox, None, {"team": "x"})
    assert sorted(s.metadata.name for s in team_x) == ["b", "c"]
    assert [s.metadata.name for s in await store.list(Sandbox, "default", {"team": "x"})] == ["b"]
    assert await store.list(Sandbox, None, {"team": "x", "tier": "2"}) == []
    assert await store.list(Sandbox, "empty-namespace") == []
    assert [p.metadata.name for p in await store.list(SandboxPool)] == ["default-pool"]


# -- update / update_status ------------------------------------------------------------------
async def test_update_with_stale_resource_version_conflicts(store: ObjectStore) -> None:
    created = await store.create(sandbox("a"))
    first = created.model_copy(deep=True)
    first.metadata.labels["who"] = "first"
    await store.update(first)

    stale = created.model_copy(deep=True)
    stale.metadata.labels["who"] = "second"
    with pytest.raises(Conflict, match="read it again"):
        await store.update(stale)
    with pytest.raises(Conflict):
        await store.update_status(stale)
    assert (await store.get(Sandbox, "default", "a")).metadata.labels == {"who": "first"}

    # An empty resourceVersion means "whatever is stored": last writer wins.
    stale.metadata.resource_version = ""
    assert (await store.update(stale)).metadata.labels == {"who": "second"}


async def test_generation_moves_only_with_spec(store: ObjectStore) -> None:
    obj = await store.create(sandbox("a"))
    obj.metadata.labels["k"] = "v"
    obj.metadata.annotations["note"] = "hi"
    obj = await store.update(obj)
    assert obj.metadata.generation == 1
    assert obj.metadata.annotations == {"note": "hi"}

    obj.spec.exposed_ports = [8080]
    obj = await store.update(obj)
    assert obj.metadata.generation == 2
    assert (await store.get(Sandbox, "default", "a")).spec.exposed_ports == [8080]

    obj.status.phase = SandboxPhase.RUNNING
    obj = await store.update_status(obj)
    assert obj.metadata.generation == 2


async def test_update_ignores_status_and_bookkeeping(store: ObjectStore) -> None:
    created = await store.create(sandbox("a"))
    changed = created.model_copy(deep=True)
    changed.status.phase = SandboxPhase.RUNNING
    changed.metadata.uid = "forged"
    changed.metadata.generation = 42
    changed.metadata.labels["k"] = "v"
    updated = await store.update(changed)
    assert updated.status.phase is SandboxPhase.PENDING
    assert updated.metadata.uid == created.metadata.uid
    assert updated.metadata.generation == 1
    assert updated.metadata.creation_timestamp == created.metadata.creation_timestamp
    assert updated.metadata.labels == {"k": "v"}


async def test_update_status_leaves_spec_and_metadata_alone(store: ObjectStore) -> None:
    created = await store.create(sandbox("a", labels={"k": "v"}))
    changed = created.model_copy(deep=True)
    changed.status.phase = SandboxPhase.RUNNING
    changed.status.container_id = "c-1"
    changed.spec.image = "other-image"
    changed.metadata.labels = {}
    changed.metadata.finalizers = ["x/y"]
    updated = await store.update_status(changed)
    assert updated.status.phase is SandboxPhase.RUNNING
    stored = await store.get(Sandbox, "default", "a")
    assert stored.status.container_id == "c-1"
    assert stored.spec.image == "busybox"
    assert stored.metadata.labels == {"k": "v"}
    assert stored.metadata.finalizers == []
    assert stored.metadata.generation == 1


async def test_write_that_changes_nothing_keeps_version(store: ObjectStore) -> None:
    created = await store.create(sandbox("a"))
    assert rv(await store.update(created.model_copy(deep=True))) == rv(created)
    assert rv(await store.update_status(created.model_copy(deep=True))) == rv(created)
    assert await store.current_resource_version() == created.metadata.resource_version


async def test_concurrent_updates_with_same_version_exactly_one_wins(store: ObjectStore) -> None:
    created = await store.create(sandbox("a"))

    async def attempt(i: int) -> Sandbox:
        mine = created.model_copy(deep=True)
        mine.metadata.labels["writer"] = str(i)
        return await store.update(mine)

    results = await asyncio.gather(*(attempt(i) for i in range(20)), return_exceptions=True)
    winners = [r for r in results if isinstance(r, Sandbox)]
    assert len(winners) == 1
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, Sandbox))
    stored = await store.get(Sandbox, "default", "a")
    assert stored.metadata.labels == winners[0].metadata.labels
    assert stored.metadata.resource_version == winners[0].metadata.resource_version


# -- delete / finalizers ---------------------------------------------------------------------
async def test_delete_without_finalizers_removes(store: ObjectStore) -> None:
    await store.create(sandbox("a"))
    assert await store.delete(Sandbox, "default", "a") is None
    with pytest.raises(NotFound):
        await store.get(Sandbox, "default", "a")
    await store.create(sandbox("a"))  # the name is free again


async def test_finalizers_hold_deletion_until_removed(store: ObjectStore) -> None:
    given = sandbox("a")
    given.metadata.finalizers = ["fastsandbox.io/cleanup", "other/one"]
    created = await store.create(given)
    since = await store.current_resource_version()

    marked = await store.delete(Sandbox, "default", "a")
    assert marked is not None
    stamp = marked.metadata.deletion_timestamp
    assert stamp is not None
    assert rv(marked) > rv(created)
    kept = await store.get(Sandbox, "default", "a")
    assert kept.metadata.deletion_timestamp == stamp

    again = await store.delete(Sandbox, "default", "a")  # set once, not moved
    assert again is not None
    assert again.metadata.deletion_timestamp == stamp
    assert again.metadata.resource_version == marked.metadata.resource_version

    kept.metadata.finalizers = ["other/one"]
    kept = await store.update(kept)
    assert (await store.get(Sandbox, "default", "a")).metadata.finalizers == ["other/one"]

    kept.metadata.finalizers = []
    await store.update(kept)
    with pytest.raises(NotFound):
        await store.get(Sandbox, "default", "a")

    async with contextlib.aclosing(store.watch(Sandbox, since)) as events:
        seen = [describe(await next_change(events)) for _ in range(3)]
    assert seen == [
        (EventType.MODIFIED, "a"),  # deletionTimestamp set
        (EventType.MODIFIED, "a"),  # one finalizer removed
        (EventType.DELETED, "a"),  # the last one removed
    ]


# -- watch ------------------------------------------------------------------------------------
async def test_watch_replays_then_streams_live(store: ObjectStore) -> None:
    await store.create(sandbox("before"))
    since = await store.current_resource_version()
    first = await store.create(sandbox("a"))
    await store.create(pool("not-a-sandbox"))

    async with contextlib.aclosing(store.watch(Sandbox, since)) as events:
        replayed = await next_change(events)
        assert describe(replayed) == (EventType.ADDED, "a")
        assert replayed.resource_version == first.metadata.resource_version
        assert replayed.object == first

        first.status.phase = SandboxPhase.RUNNING
        running = await store.update_status(first)
        live = await next_change(events)
        assert describe(live) == (EventType.MODIFIED, "a")
        assert live.resource_version == running.metadata.resource_version
        assert isinstance(live.object, Sandbox)
        assert live.object.status.phase is SandboxPhase.RUNNING

        await store.create(pool("another-pool"))  # other kinds do not show up
        await store.delete(Sandbox, "default", "a")
        deleted = await next_change(events)
        assert describe(deleted) == (EventType.DELETED, "a")
        assert int(deleted.resource_version) > int(live.resource_version)


async def test_watch_from_zero_replays_everything(store: ObjectStore) -> None:
    for name in ("a", "b", "c"):
        await store.create(sandbox(name))
    async with contextlib.aclosing(store.watch(Sandbox)) as events:
        seen = [describe(await next_change(events)) for _ in range(3)]
    assert seen == [(EventType.ADDED, n) for n in ("a", "b", "c")]


async def test_watch_from_too_old_version_conflicts(store: ObjectStore) -> None:
    # "1" is older than what any backend retains here: the embedded stores keep HISTORY events,
    # the apiserver's watch cache starts at the list it made when the CRD was established.
    created = [await store.create(sandbox(f"s{i}")) for i in range(HISTORY * 2)]
    with pytest.raises(Conflict, match="list again"):
        async with contextlib.aclosing(store.watch(Sandbox, "1")) as events:
            await anext(events)
    # A recent version still works.
    recent = created[-3].metadata.resource_version
    async with contextlib.aclosing(store.watch(Sandbox, recent)) as events:
        assert describe(await next_change(events)) == (EventType.ADDED, f"s{HISTORY * 2 - 2}")


async def test_watch_from_future_version_conflicts(store: ObjectStore) -> None:
    await store.create(sandbox("a"))
    future = str(int(await store.current_resource_version()) + 1000)
    with pytest.raises(Conflict):
        async with contextlib.aclosing(store.watch(Sandbox, future)) as events:
            await anext(events)


async def test_bookmark_when_idle(store: ObjectStore) -> None:
    await store.create(sandbox("a"))
    await store.create(pool("p"))  # the bookmark carries the store-wide version
    current = await store.current_resource_version()
    async with contextlib.aclosing(store.watch(Sandbox, current)) as events:
        async with asyncio.timeout(5):
            event = await anext(events)
    assert event.type is EventType.BOOKMARK
    assert event.object is None
    assert event.resource_version == current


async def test_closing_ends_watches_and_refuses_calls(store: ObjectStore) -> None:
    await store.create(sandbox("a"))
    events = store.watch(Sandbox, await store.current_resource_version())
    waiting = asyncio.ensure_future(next_change(events))
    await asyncio.sleep(0)  # let the watch subscribe
    await store.close()
    with pytest.raises(Unavailable):
        await waiting
    await events.aclose()
    with pytest.raises(Unavailable):
        await store.get(Sandbox, "default", "a")
    with pytest.raises(Unavailable):
        await store.create(sandbox("b"))


async def test_cancelled_writes_leave_the_store_consistent(
    store: ObjectStore, caps: Capabilities
) -> None:
    # Cancel creates at many points of their progress; each one either happened completely
    # (stored, counted, published) or not at all, and the store keeps working.
    async with contextlib.aclosing(store.watch(Sandbox, "0")) as events:
        for steps in range(12):
            task = asyncio.ensure_future(store.create(sandbox(f"c{steps}")))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        last = await store.create(sandbox("last"))
        stored = [s.metadata.name for s in await store.list(Sandbox)]
        if caps.dense_resource_versions:
            assert int(last.metadata.resource_version) == len(stored)
        seen = [describe(await next_change(events))[1] for _ in stored]
    assert sorted(seen) == sorted(stored)
    assert seen[-1] == "last"


# -- SQLite only: the file is the truth ------------------------------------------------------
async def test_sqlite_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "state.db"
    store = await SqliteStore.open(path, history=HISTORY, bookmark_interval=BOOKMARK_INTERVAL)
    try:
        given = sandbox("a", labels={"k": "v"})
        given.metadata.finalizers = ["fastsandbox.io/cleanup"]
        created = await store.create(given)
        created.status.phase = SandboxPhase.RUNNING
        running = await store.update_status(created)
        await store.create(pool("p"))
        last = int(await store.current_resource_version())
    finally:
        await store.close()

    store = await SqliteStore.open(path, history=HISTORY, bookmark_interval=BOOKMARK_INTERVAL)
    try:
        assert int(await store.current_resource_version()) == last
        assert await store.get(Sandbox, "default", "a") == running
        assert [p.metadata.name for p in await store.list(SandboxPool)] == ["p"]
        later = await store.create(sandbox("b"))
        assert rv(later) == last + 1
        # History survives too: a watcher can resume across the restart.
        async with contextlib.aclosing(store.watch(Sandbox, "0")) as events:
            seen = [describe(await next_change(events)) for _ in range(3)]
        assert seen == [
            (EventType.ADDED, "a"),
            (EventType.MODIFIED, "a"),
            (EventType.ADDED, "b"),
        ]
    finally:
        await store.close()


async def test_sqlite_history_trim_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStore.open(path, history=5, bookmark_interval=BOOKMARK_INTERVAL)
    try:
        for i in range(30):
            await store.create(sandbox(f"s{i}"))
    finally:
        await store.close()
    store = await SqliteStore.open(path, history=5, bookmark_interval=BOOKMARK_INTERVAL)
    try:
        with pytest.raises(Conflict):
            async with contextlib.aclosing(store.watch(Sandbox, "1")) as events:
                await anext(events)
        async with contextlib.aclosing(store.watch(Sandbox, "28")) as events:
            assert describe(await next_change(events)) == (EventType.ADDED, "s28")
    finally:
        await store.close()


async def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not an sqlite database, not even close" * 100)
    with pytest.raises(Unavailable, match=r"state\.db"):
        await SqliteStore.open(path)


_WRITER = """
import asyncio, sys
from fastsandbox.api.models import Sandbox
from fastsandbox.store.sqlite import SqliteStore

async def main() -> None:
    store = await SqliteStore.open(sys.argv[1])
    i = 0
    while True:
        sb = Sandbox.model_validate(
            {"metadata": {"name": f"k{i}"}, "spec": {"image": "busybox", "poolRef": "p"}}
        )
        await store.create(sb)
        print(f"k{i}", flush=True)
        i += 1

asyncio.run(main())
"""


async def test_sqlite_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, str(path), stdout=asyncio.subprocess.PIPE
    )
    acknowledged: list[str] = []
    try:
        assert child.stdout is not None
        async with asyncio.timeout(30):
            while len(acknowledged) < 50:
                line = await child.stdout.readline()
                assert line, "the writer process died"
                acknowledged.append(line.decode().strip())
    finally:
        child.send_signal(signal.SIGKILL)  # mid-stream: no close, no checkpoint
        await child.wait()
    store = await SqliteStore.open(path)
    try:
        stored = {s.metadata.name for s in await store.list(Sandbox)}
        assert set(acknowledged) <= stored
        assert int(await store.current_resource_version()) == len(stored)
    finally:
        await store.close()


# -- Kubernetes only: what the apiserver adds ----------------------------------------------------
@pytest.mark.kubernetes
async def test_kubernetes_invalid_objects_are_refused_naming_the_field(
    kube_crds: Any, kube_namespace: str
) -> None:
    from fastsandbox.errors import InvalidArgument
    from fastsandbox.store.kubernetes import KubernetesStore

    store = await KubernetesStore.open(kube_crds.kubeconfig)
    try:
        valid = sandbox("bad", namespace=kube_namespace)
        # model_copy skips the models' own validation: this is what kubectl could send.
        spec = valid.spec.model_copy(update={"exposed_ports": [0], "image": ""})
        with pytest.raises(InvalidArgument, match=r"spec\.exposedPorts\[0\]") as refused:
            await store.create(valid.model_copy(update={"spec": spec}))
        assert "spec.image" in refused.value.message
        with pytest.raises(NotFound, match="namespace 'no-such-namespace'"):
            await store.create(sandbox("a", namespace="no-such-namespace"))
    finally:
        await store.close()


@pytest.mark.kubernetes
async def test_kubernetes_update_keeps_metadata_the_models_do_not_carry(
    kube_crds: Any, kube_admin: Any, kube_namespace: str
) -> None:
    from lightkube.types import PatchType

    from fastsandbox._kube.resources import SandboxResource
    from fastsandbox.store.kubernetes import KubernetesStore

    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": "1234"}
    store = await KubernetesStore.open(kube_crds.kubeconfig)
    try:
        await store.create(sandbox("a", namespace=kube_namespace, labels={"k": "v"}))
        # Someone else (a higher-level controller) makes it a dependent of their object.
        kube_admin.patch(
            SandboxResource,
            "a",
            {"metadata": {"ownerReferences": [owner]}},
            namespace=kube_namespace,
            patch_type=PatchType.MERGE,
        )
        obj = await store.get(Sandbox, kube_namespace, "a")
        obj.metadata.labels = {"other": "label"}
        obj.spec.exposed_ports = [8080]
        updated = await store.update(obj)
        assert updated.metadata.labels == {"other": "label"}
        assert updated.metadata.generation == 2
        assert await store.update(updated.model_copy(deep=True)) == updated  # still a no-op
        stored = kube_admin.get(SandboxResource, "a", namespace=kube_namespace)
        assert stored["metadata"]["ownerReferences"] == [owner]
        assert stored["metadata"]["labels"] == {"other": "label"}
    finally:
        await store.close()


@pytest.mark.kubernetes
async def test_kubernetes_unreachable_apiserver_is_unavailable(
    kube_crds: Any, tmp_path: Path
) -> None:
    import yaml

    from fastsandbox.store.kubernetes import KubernetesStore
    from tests.infra import free_port

    config = yaml.safe_load(kube_crds.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    dead = tmp_path / "kubeconfig"
    dead.write_text(yaml.safe_dump(config))
    store = await KubernetesStore.open(dead)
    try:
        with pytest.raises(Unavailable, match="cannot reach the Kubernetes apiserver"):
            await store.get(Sandbox, "default", "a")
    finally:
        await store.close()


@pytest.mark.kubernetes
async def test_kubernetes_watch_survives_an_apiserver_restart(tmp_path: Path) -> None:
    # Its own apiserver: restarting the session's would disturb other tests' watches.
    from lightkube import Client, KubeConfig

    from fastsandbox.store.kubernetes import KubernetesStore
    from tests.k8s_fixtures import install_crds
    from tests.k8s_infra import KubeBinariesUnavailable, start_kube_apiserver

    try:
        api = start_kube_apiserver(tmp_path)
    except KubeBinariesUnavailable as exc:
        cannot_run(str(exc))
    try:
        admin = Client(KubeConfig.from_file(api.kubeconfig))
        try:
            install_crds(admin)
        finally:
            admin.close()
        store = await KubernetesStore.open(api.kubeconfig, bookmark_interval=BOOKMARK_INTERVAL)
        try:
            before = await store.create(sandbox("before"))
            async with contextlib.aclosing(
                store.watch(Sandbox, before.metadata.resource_version)
            ) as events:
                assert (await anext(events)).type is EventType.BOOKMARK  # the watch is open
                await asyncio.to_thread(api.restart_apiserver)
                after = await store.create(sandbox("after"))
                # The watch reconnects with backoff (at most a few seconds) from where it was.
                async with asyncio.timeout(20):
                    while (change := await anext(events)).type is EventType.BOOKMARK:
                        assert change.resource_version == before.metadata.resource_version
                assert describe(change) == (EventType.ADDED, "after")
                assert change.object == after
        finally:
            await store.close()
    finally:
        api.stop()
