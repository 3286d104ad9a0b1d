"""Fast mode answers once the agent started the process and stores the record right after
(DESIGN.md §5); Strong mode stores first. A store whose `create` is held open shows the order:
the Fast reply comes while nothing is stored, the record is served meanwhile, and writes to the
same sandbox wait for the record."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fastsandbox.api.labels import REQUEST_LABEL
from fastsandbox.api.models import ConsistencyMode, EnvVar, ObjectMeta, Sandbox, SandboxSpec
from fastsandbox.control.create_request import CreateOptions
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.errors import NotFound
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.store.memory import MemoryStore
from tests.unit.test_control_plane import make_pool

T = TypeVar("T")


class HeldStore(MemoryStore):
    """A memory store whose Sandbox creates wait until `release` is set."""

    def __init__(self) -> None:
        super().__init__(bookmark_interval=0.5)
        self.release = asyncio.Event()
        self.waiting = 0

    async def create(self, obj: T) -> T:  # type: ignore[override]
        if isinstance(obj, Sandbox):
            self.waiting += 1
            await self.release.wait()
        result: Any = await super().create(obj)  # type: ignore[type-var]
        return result  # type: ignore[no-any-return]


@pytest.fixture
async def held(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, HeldStore]]:
    store = HeldStore()
    await make_pool(store, "p", agents=1, per_agent=4)
    cp = ControlPlane(
        store,
        InProcessFleet(tmp_path),
        PlaneSettings(delete_grace_seconds=0, heartbeat_seconds=0.1),
    )
    await cp.start()
    try:
        yield cp, store
    finally:
        store.release.set()
        await cp.close()
        await store.close()


def _sandbox(name: str) -> Sandbox:
    return Sandbox(metadata=ObjectMeta(name=name), spec=SandboxSpec(image="busybox", pool_ref="p"))


async def test_fast_answers_before_the_record_is_stored_and_serves_it_meanwhile(
    held: tuple[ControlPlane, HeldStore],
) -> None:
    cp, store = held
    svc = cp.sandboxes
    made = await asyncio.wait_for(svc.create(_sandbox("f1"), CreateOptions()), timeout=5)
    assert made.status.phase.value == "Running"
    assert store.waiting == 1  # the record write is still held
    with pytest.raises(NotFound):
        await MemoryStore.get(store, Sandbox, "default", "f1")
    served = await svc.get("default", "f1")
    assert served.metadata.uid == made.metadata.uid
    assert [s.metadata.name for s in await svc.list("default")] == ["f1"]

    # A delete of the same sandbox waits for the record, then goes through.
    deleting = asyncio.ensure_future(svc.delete("default", "f1", wait=True))
    await asyncio.sleep(0.1)
    assert not deleting.done()
    store.release.set()
    await asyncio.wait_for(deleting, timeout=5)
    with pytest.raises(NotFound):
        await svc.get("default", "f1")


async def test_strong_answers_only_after_the_record_is_stored(
    held: tuple[ControlPlane, HeldStore],
) -> None:
    cp, store = held
    strong = asyncio.ensure_future(
        cp.sandboxes.create(_sandbox("s1"), CreateOptions(mode=ConsistencyMode.STRONG))
    )
    await asyncio.sleep(0.2)
    assert not strong.done()
    store.release.set()
    made = await asyncio.wait_for(strong, timeout=5)
    stored = await store.get(Sandbox, "default", "s1")
    assert stored.metadata.uid == made.metadata.uid


async def test_a_request_too_big_for_its_label_is_stored_before_the_answer(
    held: tuple[ControlPlane, HeldStore],
) -> None:
    cp, store = held
    sb = _sandbox("big")
    sb.spec.env = [EnvVar(name="BIG", value="x" * 5000)]  # over containerd's 4 KiB label
    fast = asyncio.ensure_future(cp.sandboxes.create(sb, CreateOptions()))
    while store.waiting == 0:  # bounded by the test's own timeout
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert not fast.done()  # nothing would rebuild it after a crash: no answer before the write
    store.release.set()
    made = await asyncio.wait_for(fast, timeout=5)
    stored = await store.get(Sandbox, "default", "big")
    assert stored.metadata.uid == made.metadata.uid
    fleet = cp.fleet
    assert isinstance(fleet, InProcessFleet)
    spec = fleet.runtime(made.status.assigned_agent).specs[made.status.container_id]
    assert REQUEST_LABEL not in dict(spec.labels)


async def test_with_store_after_reply_the_record_waits_for_the_answer_to_leave(
    held: tuple[ControlPlane, HeldStore],
) -> None:
    """`store_after_reply` (the controller): the record's write starts only once the caller's
    answer has left (`CreateOptions.replied`); without that signal at once."""
    cp, store = held
    svc = cp.sandboxes
    svc.store_after_reply = True
    store.release.set()
    replied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    made = await asyncio.wait_for(
        svc.create(_sandbox("r1"), CreateOptions(replied=replied)), timeout=5
    )
    assert made.status.phase.value == "Running"
    await asyncio.sleep(0.02)  # well under the bound (REPLY_WAIT_SECONDS): still unstored
    assert store.waiting == 0
    assert (await svc.get("default", "r1")).status.phase.value == "Running"  # from memory
    replied.set_result(None)
    await _stored(store, "r1")

    # A reply that never reports back holds the record only for the bound.
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    await asyncio.wait_for(svc.create(_sandbox("r2"), CreateOptions(replied=never)), timeout=5)
    await _stored(store, "r2")


async def _stored(store: HeldStore, name: str) -> None:
    for _ in range(200):
        try:
            await MemoryStore.get(store, Sandbox, "default", name)
            return
        except NotFound:
            await asyncio.sleep(0.01)
    pytest.fail(f"{name} was never stored")
