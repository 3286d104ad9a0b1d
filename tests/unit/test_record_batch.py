"""`RecordBatcher`: the records of answered Fast creates go to the store together, each with
its own outcome; a failing write fails each of its records (their callers retry); a store
without batches gets one create each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from fastsandbox.api.models import ObjectMeta, Sandbox, SandboxSpec
from fastsandbox.control.record_batch import RecordBatcher
from fastsandbox.errors import AlreadyExists, FsbError, NotFound, Unavailable
from fastsandbox.store.memory import MemoryStore


def sandbox(name: str) -> Sandbox:
    return Sandbox(metadata=ObjectMeta(name=name), spec=SandboxSpec(image="busybox", pool_ref="p"))


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    opened = MemoryStore()
    yield opened
    await opened.close()


@dataclass
class Spy:
    """A batch store that counts its writes and fails the first `fail` of them."""

    inner: MemoryStore
    fail: int = 0
    writes: list[int] = field(default_factory=list)

    async def create(self, sb: Sandbox) -> Sandbox:
        self.writes.append(1)
        return await self.inner.create(sb)

    async def create_many(self, objs: Sequence[Sandbox]) -> list[Sandbox | FsbError]:
        self.writes.append(len(objs))
        if self.fail:
            self.fail -= 1
            raise Unavailable("the state database is locked")
        return await self.inner.create_many(objs)


async def test_records_handed_in_together_are_one_write(store: MemoryStore) -> None:
    spy = Spy(store)
    batcher = RecordBatcher(spy)  # type: ignore[arg-type]
    await store.create(sandbox("taken"))
    names = [f"r{i}" for i in range(50)]
    out = await asyncio.gather(
        *(batcher.create(sandbox(n)) for n in [*names, "taken"]), return_exceptions=True
    )
    assert spy.writes == [51]
    assert [o.metadata.name for o in out[:50] if isinstance(o, Sandbox)] == names
    assert isinstance(out[50], AlreadyExists)
    for name in names:
        assert (await store.get(Sandbox, "default", name)).metadata.uid


async def test_records_handed_in_during_a_write_share_the_next(store: MemoryStore) -> None:
    spy = Spy(store)
    batcher = RecordBatcher(spy)  # type: ignore[arg-type]
    first = asyncio.ensure_future(batcher.create(sandbox("a")))
    await asyncio.sleep(0)  # the first write is on its way
    rest = [asyncio.ensure_future(batcher.create(sandbox(n))) for n in ("b", "c", "d")]
    await asyncio.gather(first, *rest)
    assert sum(spy.writes) == 4 and len(spy.writes) <= 2


async def test_a_failing_write_fails_each_record_of_it(store: MemoryStore) -> None:
    spy = Spy(store, fail=1)
    batcher = RecordBatcher(spy)  # type: ignore[arg-type]
    out = await asyncio.gather(
        *(batcher.create(sandbox(n)) for n in ("x", "y")), return_exceptions=True
    )
    assert all(isinstance(o, Unavailable) for o in out)
    with pytest.raises(NotFound):
        await store.get(Sandbox, "default", "x")
    assert (await batcher.create(sandbox("x"))).metadata.name == "x"  # a retry goes through


async def test_a_store_without_batches_gets_one_create_each(store: MemoryStore) -> None:
    @dataclass
    class OneByOne:
        inner: MemoryStore
        calls: int = 0

        async def create(self, sb: Sandbox) -> Sandbox:
            self.calls += 1
            return await self.inner.create(sb)

    plain = OneByOne(store)
    batcher = RecordBatcher(plain)  # type: ignore[arg-type]
    await asyncio.gather(*(batcher.create(sandbox(n)) for n in ("p", "q", "r")))
    assert plain.calls == 3
