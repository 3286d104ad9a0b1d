"""Leader election logic over the in-memory Lease: one step at a time under a fake clock, then
the campaign/lead/step-down loop with short real durations."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from fastsandbox._kube.lease import LeaderElector, LeaseRecord, MemoryLeaseApi

LIVENESS_SECONDS = 60.0  # generous liveness bound for the real-time loops; nothing is timed


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(api: MemoryLeaseApi, identity: str, clock: FakeClock, duration: float = 15.0):
    return LeaderElector(api, identity, lease_duration=duration, clock=clock)


async def test_first_candidate_creates_the_lease() -> None:
    api, clock = MemoryLeaseApi(), FakeClock()
    a = elector(api, "a", clock)
    assert await a.try_acquire_or_renew()
    assert api.record is not None
    assert api.record.holder == "a"
    assert api.record.duration_seconds == 15
    assert api.record.transitions == 0
    assert api.record.acquire_time is not None
    assert api.record.acquire_time == api.record.renew_time


async def test_a_held_lease_is_not_taken_before_its_duration_on_our_clock() -> None:
    api, clock = MemoryLeaseApi(), FakeClock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()  # b starts observing now
    clock.now += 14.9
    assert not await b.try_acquire_or_renew()
    clock.now += 0.2
    assert await b.try_acquire_or_renew()
    assert api.record is not None
    assert api.record.holder == "b"
    assert api.record.transitions == 1


async def test_renewals_restart_the_candidates_wait() -> None:
    api, clock = MemoryLeaseApi(), FakeClock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    for _ in range(10):
        clock.now += 5
        assert await a.try_acquire_or_renew()
        assert not await b.try_acquire_or_renew()
    assert api.record is not None
    assert api.record.holder == "a"


async def test_the_holders_wall_clock_is_never_compared_with_ours() -> None:
    # The holder's renewTime is an hour in the past (skewed clock), yet it renews: still held.
    api, clock = MemoryLeaseApi(), FakeClock()
    skewed = LeaderElector(
        api, "a", lease_duration=15, clock=clock, wall=lambda: datetime(2000, 1, 1, tzinfo=UTC)
    )
    b = elector(api, "b", clock)
    assert await skewed.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    clock.now += 5
    assert await skewed.try_acquire_or_renew()
    clock.now += 12
    assert not await b.try_acquire_or_renew()


async def test_a_rival_write_in_between_loses_the_race() -> None:
    api, clock = MemoryLeaseApi(), FakeClock()
    api.record = LeaseRecord(holder="old", duration_seconds=1, resource_version="7")
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert not await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    clock.now += 2
    real_update = api.update

    async def b_first(record: LeaseRecord) -> LeaseRecord:
        api.update = real_update  # type: ignore[method-assign]
        await b.try_acquire_or_renew()
        return await real_update(record)

    api.update = b_first  # type: ignore[method-assign]
    assert not await a.try_acquire_or_renew()  # Conflict: b wrote with the same resourceVersion
    assert api.record is not None
    assert api.record.holder == "b"


async def test_a_released_lease_is_taken_at_once() -> None:
    api, clock = MemoryLeaseApi(), FakeClock()
    api.record = LeaseRecord(holder="", duration_seconds=1, transitions=4, resource_version="3")
    b = elector(api, "b", clock)
    assert await b.try_acquire_or_renew()
    assert api.record.holder == "b"
    assert api.record.transitions == 5


async def test_an_unreachable_apiserver_is_no_leadership() -> None:
    api, clock = MemoryLeaseApi(), FakeClock()
    a = elector(api, "a", clock)
    api.fail = True
    assert not await a.try_acquire_or_renew()
    api.fail = False
    assert await a.try_acquire_or_renew()


class Probe:
    """Callbacks that record when leadership started and stopped."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()
        self.cancelled = False
        self.started_at = self.stopped_at = 0.0

    async def lead(self) -> None:
        self.started_at = asyncio.get_running_loop().time()
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    async def stop(self) -> None:
        self.stopped_at = asyncio.get_running_loop().time()
        self.stopped.set()


async def test_one_of_two_leads_and_the_other_takes_over_when_it_is_cut_off() -> None:
    # Two replicas, each with its own view of the apiserver: cutting one off is a partition.
    store = MemoryLeaseApi()
    cut = {"a": False, "b": False}
    last_write = {"a": 0.0, "b": 0.0}  # when each last sent a write that then succeeded

    class View:
        def __init__(self, who: str) -> None:
            self.who = who

        async def get(self) -> LeaseRecord | None:
            store.fail = cut[self.who]
            return await store.get()

        async def create(self, record: LeaseRecord) -> LeaseRecord:
            return await self._write(store.create, record)

        async def update(self, record: LeaseRecord) -> LeaseRecord:
            return await self._write(store.update, record)

        async def _write(
            self, write: Callable[[LeaseRecord], Awaitable[LeaseRecord]], record: LeaseRecord
        ) -> LeaseRecord:
            store.fail = cut[self.who]
            sent = asyncio.get_running_loop().time()
            written = await write(record)
            last_write[self.who] = sent
            return written

    a = LeaderElector(View("a"), "a", lease_duration=2)
    b = LeaderElector(View("b"), "b", lease_duration=2)
    pa, pb = Probe(), Probe()
    ta = asyncio.create_task(a.run(pa.lead, pa.stop))
    await asyncio.wait_for(pa.started.wait(), LIVENESS_SECONDS)
    tb = asyncio.create_task(b.run(pb.lead, pb.stop))
    try:
        await asyncio.sleep(2.5)  # longer than a lease: a keeps renewing, b keeps waiting
        assert a.is_leader and not b.is_leader
        assert not pb.started.is_set()

        cut["a"] = True
        cut_at = asyncio.get_running_loop().time()
        await asyncio.wait_for(pa.stopped.wait(), LIVENESS_SECONDS)
        assert pa.cancelled
        await asyncio.wait_for(pb.started.wait(), LIVENESS_SECONDS)
        # The order, not the speed (benchmarks/leader_failover.py prints how long it takes):
        # a stops leading (its renew deadline, 1.33 s) before b takes over, and b takes the
        # Lease only once a full lease duration passed since a's last renewal was sent.
        assert last_write["a"] <= cut_at <= pa.stopped_at < pb.started_at
        assert pb.started_at >= last_write["a"] + 2
        assert store.record is not None
        assert store.record.holder == "b"
        assert store.record.transitions == 1
    finally:
        for task in (ta, tb):
            task.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)


async def test_cancelling_the_leader_releases_the_lease() -> None:
    api = MemoryLeaseApi()
    a = LeaderElector(api, "a", lease_duration=3)
    probe = Probe()
    task = asyncio.create_task(a.run(probe.lead, probe.stop))
    await asyncio.wait_for(probe.started.wait(), LIVENESS_SECONDS)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert probe.stopped.is_set()
    assert api.record is not None
    assert api.record.holder == ""
    b = LeaderElector(api, "b", lease_duration=3)
    assert await b.try_acquire_or_renew()  # no wait for the 3 s lease


async def test_crashed_leading_work_steps_down() -> None:
    api = MemoryLeaseApi()
    a = LeaderElector(api, "a", lease_duration=1.5)
    stopped = asyncio.Event()

    async def crash() -> None:
        raise RuntimeError("boom")

    async def stop() -> None:
        stopped.set()

    task = asyncio.create_task(a.run(crash, stop))
    try:
        await asyncio.wait_for(stopped.wait(), LIVENESS_SECONDS)
        assert api.record is not None
        assert api.record.holder == ""
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_durations_are_derived_from_the_lease() -> None:
    e = LeaderElector(MemoryLeaseApi(), "a", lease_duration=15)
    assert e.renew_interval == 5
    assert e.renew_deadline == 10
    with pytest.raises(ValueError):
        LeaderElector(MemoryLeaseApi(), "a", lease_duration=0.5)
