"""Warm slots in the agent's manager: capacity accounting, claim and refill, cordon, restart.

The runtime is the in-memory fake, but each warm container's PID 1 is the real
`fsb-supervisor --warm` run as a host process that dials the manager's real channel, so a slot
is ready only when its supervisor waits, and a claim really goes through `start_main`.
Bounds only stop a hung test; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fastsandbox.agent.manager import SandboxManager
from fastsandbox.agent.requests import SandboxRequest
from fastsandbox.agent.runtime.base import ContainerSpec, ContainerState
from fastsandbox.agent.runtime.fake import FakeRuntime
from fastsandbox.agent.warm import ClaimUncertain
from fastsandbox.api.images import normalize_image_ref
from fastsandbox.api.labels import WARM_SLOT_LABEL
from fastsandbox.errors import CapacityExhausted, RuntimeFailure
from fastsandbox.settings import AgentSettings
from tests.unit.supervisor_fixtures import supervisor_bin  # noqa: F401 - fixture

HOT = "127.0.0.1:5000/hot:latest"
OTHER = "127.0.0.1:5000/other:latest"
BOUND = 20.0


class SupervisedFake(FakeRuntime):
    """The fake, with a real waiting supervisor as each warm container's PID 1."""

    def __init__(self, binary: Path) -> None:
        super().__init__()
        self.binary = binary
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    async def create(self, spec: ContainerSpec) -> ContainerState:
        state = await super().create(spec)
        if spec.warm and spec.id not in self.procs:
            self.procs[spec.id] = self._pid1(spec)
        return state

    def _pid1(self, spec: ContainerSpec) -> subprocess.Popen[bytes]:
        env = dict(spec.init_env)
        env["FSB_CHANNEL"] = str(spec.channel_dir)  # the host side of /.fsb/run
        env["FSB_WARM"] = "1"
        env["PATH"] = "/usr/bin:/bin"
        return subprocess.Popen(
            [str(self.binary)], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def delete(self, container_id: str, grace_seconds: float) -> bool:
        proc = self.procs.pop(container_id, None)
        if proc is not None:
            proc.kill()
            proc.wait()
        return await super().delete(container_id, grace_seconds)

    def close_all(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def settings(tmp_path: Path, capacity: int = 3) -> AgentSettings:
    return AgentSettings(
        name="a1",
        pool="p",
        namespace="default",
        listen=f"unix://{tmp_path / 'agent.sock'}",
        state_dir=tmp_path / "state",
        containerd_socket=tmp_path / "none.sock",
        capacity=capacity,
        init_path=tmp_path / "fsb-supervisor",  # only its presence matters to the manager
        warm_slots=1,
        warm_images=(HOT,),
        warm_recent=0,
    )


@pytest.fixture
async def runtime(supervisor_bin: Path) -> AsyncIterator[SupervisedFake]:  # noqa: F811
    rt = SupervisedFake(supervisor_bin)
    yield rt
    rt.close_all()


@pytest.fixture
async def manager(runtime: SupervisedFake, tmp_path: Path) -> AsyncIterator[SandboxManager]:
    for image in (HOT, OTHER):
        await runtime.pull(image)
    m = SandboxManager(runtime, settings(tmp_path))
    await m.start()
    yield m
    await m.aclose()


async def until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def ready(m: SandboxManager) -> int:
    assert m.warm is not None
    return {c.image: c.ready for c in m.warm.counts()}.get(normalize_image_ref(HOT), 0)


def req(sid: str, image: str = HOT) -> SandboxRequest:
    return SandboxRequest(sandbox_id=sid, image=image, command=("sleep", "30"))


def counter(m: SandboxManager, result: str) -> float:
    value = m.metrics.registry.get_sample_value("fsb_warm_slot_claims_total", {"result": result})
    return value or 0.0


async def test_claim_refill_and_capacity(manager: SandboxManager, runtime: SupervisedFake) -> None:
    await until(lambda: ready(manager) == 1, "a warm slot")
    status = await manager.status()
    # A ready slot is not a sandbox and not a used slot, but it holds capacity.
    assert (status.used_slots, status.sandboxes) == (0, [])
    assert manager.free_slots() == 2
    claimed = await manager.create(req("sb-w"))
    assert claimed.warm and claimed.id == "sb-w"
    slot = next(iter(runtime.claims))
    assert slot.startswith("w-") and runtime.claims[slot].argv == ("sleep", "30")
    assert (counter(manager, "hit"), counter(manager, "miss")) == (1, 0)
    await until(lambda: ready(manager) == 1, "the refill")
    assert manager.free_slots() == 1
    # Another image: cold; then the last room is the slot's, which is retired for it.
    assert not (await manager.create(req("sb-c1", OTHER))).warm
    assert not (await manager.create(req("sb-c2", OTHER))).warm
    assert counter(manager, "miss") == 2
    assert ready(manager) == 0
    with pytest.raises(CapacityExhausted):
        await manager.create(req("sb-c3", OTHER))
    status = await manager.status()
    assert sorted(s.id for s in status.sandboxes) == ["sb-c1", "sb-c2", "sb-w"]
    # Only the claimed slot's supervisor runs now (PID 1 of sb-w); the retired one is gone.
    await until(lambda: set(runtime.procs) == {slot}, "the retired slot's removal")
    # The claimed sandbox answers by its sandbox id; its container keeps the slot's id.
    assert (await manager.get("sb-w")).id == "sb-w"
    with pytest.raises(Exception, match="not found"):
        await manager.get(slot)
    assert await manager.delete("sb-w")
    assert slot not in {s.id for s in await runtime.list()}
    await until(lambda: ready(manager) == 1, "a slot in the room the delete made")


async def test_the_refill_waits_until_creates_stop_coming(
    manager: SandboxManager, runtime: SupervisedFake
) -> None:
    warm = manager.warm
    assert warm is not None
    await until(lambda: ready(manager) == 1, "a warm slot")
    now = [1000.0]
    warm.clock = lambda: now[0]  # time stands still: creates keep "just" being served
    assert (await manager.create(req("sb-q1"))).warm
    made = len(runtime.procs)
    await asyncio.sleep(1.0)  # whatever the machine's speed: the clock did not move
    assert (ready(manager), warm.busy(), len(runtime.procs)) == (0, 0, made)
    now[0] += 1.0  # a second without a create: the refill goes on
    await until(lambda: ready(manager) == 1, "the refill after the quiet period")


async def test_the_refill_defers_only_so_long(
    manager: SandboxManager, runtime: SupervisedFake
) -> None:
    warm = manager.warm
    assert warm is not None
    await until(lambda: ready(manager) == 1, "a warm slot")
    now = [1000.0]
    warm.clock = lambda: now[0]
    assert (await manager.create(req("sb-d1"))).warm
    # Creates keep coming (each one "just" served), but time passes beyond the longest wait.
    for _ in range(40):
        warm.served(warm.kind(HOT))
        now[0] += 0.1
        await asyncio.sleep(0.01)
        if ready(manager) == 1:
            break
    await until(lambda: ready(manager) == 1, "the refill despite the stream of creates")


async def test_a_slot_that_could_not_be_made_is_tried_again_without_a_create(
    runtime: SupervisedFake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refill used to give up after a failed slot until the next create or delete woke it:
    an agent that nothing touched kept one slot fewer for good."""
    monkeypatch.setattr("fastsandbox.agent.warm.RETRY_SECONDS", 0.05)
    await runtime.pull(HOT)
    real_create = runtime.create
    failures = [2]

    async def failing_twice(spec: ContainerSpec) -> ContainerState:
        if spec.warm and failures[0] > 0:
            failures[0] -= 1
            raise RuntimeFailure("containerd said no")
        return await real_create(spec)

    runtime.create = failing_twice  # type: ignore[method-assign]
    m = SandboxManager(runtime, settings(tmp_path))
    await m.start()
    try:
        # No create, no delete, no cordon: only the refill's own retries can make it.
        await until(lambda: ready(m) == 1, "the slot, after two failed tries")
        assert failures == [0]
        assert m.warm is not None and m.warm.busy() == 0
    finally:
        await m.aclose()


async def test_a_create_waits_for_the_room_a_slot_being_made_holds(
    manager: SandboxManager, runtime: SupervisedFake
) -> None:
    """Capacity 3, all of it sandboxes but for one slot whose container is still being made:
    a create used to be refused "full" by an agent running two sandboxes."""
    await until(lambda: ready(manager) == 1, "a warm slot")
    for sid in ("sb-1", "sb-2", "sb-3"):  # the third retires the ready slot for its room
        assert not (await manager.create(req(sid, OTHER))).warm
    warm = manager.warm
    assert warm is not None
    await until(lambda: warm.busy() == 0, "the retired slot's removal")
    gate = asyncio.Event()
    real_create = runtime.create

    async def held_slot(spec: ContainerSpec) -> ContainerState:
        if spec.warm:
            await gate.wait()
        return await real_create(spec)

    runtime.create = held_slot  # type: ignore[method-assign]
    assert await manager.delete("sb-3")
    await until(lambda: warm.busy() == 1, "the refill making a slot in the room")
    assert manager.free_slots() == 0
    create = asyncio.create_task(manager.create(req("sb-4", OTHER)))
    await asyncio.sleep(0.3)
    assert not create.done()  # waiting for the slot, not refused
    gate.set()
    made = await asyncio.wait_for(create, BOUND)
    assert made.id == "sb-4" and not made.warm  # the new slot was retired for it
    status = await manager.status()
    assert sorted(s.id for s in status.sandboxes) == ["sb-1", "sb-2", "sb-4"]
    with pytest.raises(CapacityExhausted, match=r"full \(3 sandbox\(es\)"):
        await manager.create(req("sb-5", OTHER))


async def test_cordon_retires_slots_and_counts_them_until_gone(
    manager: SandboxManager, runtime: SupervisedFake
) -> None:
    await until(lambda: ready(manager) == 1, "a warm slot")
    manager.cordon(True)
    await until(lambda: ready(manager) == 0, "the slot retired")
    await until(lambda: not runtime.procs, "its removal")
    status = await manager.status()
    assert (status.used_slots, status.sandboxes) == (0, [])
    manager.cordon(False)
    await until(lambda: ready(manager) == 1, "slots again once uncordoned")


async def test_a_restarted_agent_removes_the_slots_it_finds(
    manager: SandboxManager, runtime: SupervisedFake, tmp_path: Path
) -> None:
    await until(lambda: ready(manager) == 1, "a warm slot")
    await manager.create(req("sb-w"))
    await until(lambda: ready(manager) == 1, "the refill")
    old = {s.id for s in await runtime.list() if WARM_SLOT_LABEL in s.labels}
    await manager.aclose()  # the agent goes; its containers stay
    again = SandboxManager(runtime, settings(tmp_path))
    await again.start()
    try:
        await until(lambda: ready(again) == 1, "a fresh slot")
        now = {s.id for s in await runtime.list() if WARM_SLOT_LABEL in s.labels}
        assert now and not now & old
        # The claimed sandbox is adopted by its sandbox id.
        assert [s.id for s in (await again.status()).sandboxes] == ["sb-w"]
        assert (await again.get("sb-w")).id == "sb-w"
    finally:
        await again.aclose()


async def test_a_claim_that_fails_after_start_main_is_not_retried_cold(
    manager: SandboxManager, runtime: SupervisedFake
) -> None:
    await until(lambda: ready(manager) == 1, "a warm slot")
    real_claim = runtime.claim

    async def failing_claim(container_id: str, spec: ContainerSpec, start: Any) -> ContainerState:
        async def started_then_lost(main: Any) -> None:
            await start(main)
            raise RuntimeFailure("record update lost")

        return await real_claim(container_id, spec, started_then_lost)

    runtime.claim = failing_claim  # type: ignore[method-assign]
    with pytest.raises(ClaimUncertain, match="after its process was started"):
        await manager.create(req("sb-x"))
    # No cold container was made for it: the user's command ran once, in the slot.
    assert "sb-x" not in {s.id for s in await runtime.list()}
    assert (await manager.status()).sandboxes == []


async def test_where_limits_are_fixed_slots_are_kept_per_image_and_limits(
    runtime: SupervisedFake, tmp_path: Path
) -> None:
    """gVisor cannot change a running sandbox's limits: a slot serves only a create asking for
    exactly the limits it was made with, and a served create makes its own kind hot."""
    for image in (HOT, OTHER):
        await runtime.pull(image)
    s = replace(settings(tmp_path, capacity=4), runtime="gvisor", warm_recent=2)
    m = SandboxManager(runtime, s)
    await m.start()
    try:
        await until(lambda: ready(m) == 1, "the pinned slot (default limits)")
        sized = replace(req("sb-1"), cpu_millis=500, memory_bytes=64 << 20, pids_limit=50)
        assert not (await m.create(sized)).warm  # the default-limits slot cannot serve it
        await until(lambda: ready(m) == 2, "a slot of the served limits")
        assert m.warm is not None
        made = [spec for cid, spec in runtime.specs.items() if cid in m.warm.ready_ids()]
        assert {(x.cpu_millis, x.memory_bytes, x.pids_limit) for x in made} == {
            (None, None, None),
            (500, 64 << 20, 50),
        }
        assert (await m.create(replace(sized, sandbox_id="sb-2"))).warm
        # A create of the defaults still claims the pinned slot.
        assert (await m.create(req("sb-3"))).warm
    finally:
        await m.aclose()


async def test_slots_are_made_with_the_limits_their_image_was_last_asked_for(
    manager: SandboxManager, runtime: SupervisedFake
) -> None:
    """Under runc a claim of a slot with other limits updates them (a `runc update`); slots made
    after a create carry that create's limits, so the next create asking the same needs none."""
    await until(lambda: ready(manager) == 1, "a warm slot")
    assert manager.warm is not None
    first = next(iter(manager.warm.ready_ids()))
    assert (runtime.specs[first].cpu_millis, runtime.specs[first].memory_bytes) == (None, None)
    limited = replace(req("sb-l1"), cpu_millis=1000, memory_bytes=512 << 20, pids_limit=300)
    assert (await manager.create(limited)).warm
    await until(lambda: ready(manager) == 1, "the refill")
    refill = next(iter(manager.warm.ready_ids()))
    spec = runtime.specs[refill]
    assert (spec.cpu_millis, spec.memory_bytes, spec.pids_limit) == (1000, 512 << 20, 300)
    # Any create still claims it: its own limits are what the sandbox gets (Runtime.claim).
    claimed = await manager.create(req("sb-l2"))
    assert claimed.warm
    assert runtime.specs[refill].cpu_millis is None


async def test_slots_are_made_with_the_pools_default_limits(
    runtime: SupervisedFake, tmp_path: Path
) -> None:
    """A slot carries the limits a create of the pool's defaults asks for (`--slot-*`), so that
    create changes none; under runc a create of other limits still claims a slot of its image."""
    for image in (HOT, OTHER):
        await runtime.pull(image)
    s = replace(settings(tmp_path), slot_cpu_millis=500, slot_memory_bytes=64 << 20, slot_pids=50)
    m = SandboxManager(runtime, s)
    await m.start()
    try:
        await until(lambda: ready(m) == 1, "the pinned slot")
        assert m.warm is not None
        (cid,) = m.warm.ready_ids()
        made = runtime.specs[cid]
        assert (made.cpu_millis, made.memory_bytes, made.pids_limit) == (500, 64 << 20, 50)
        other = replace(req("sb-1"), cpu_millis=250, memory_bytes=32 << 20, pids_limit=20)
        assert (await m.create(other)).warm
        assert runtime.specs[cid].cpu_millis == 250  # the record is the request's
    finally:
        await m.aclose()


async def test_where_limits_are_fixed_the_pinned_slot_has_the_pools_default_limits(
    runtime: SupervisedFake, tmp_path: Path
) -> None:
    """gVisor: the pinned kind is the pool's defaults, so a create of them claims it, and one
    asking other limits does not."""
    for image in (HOT, OTHER):
        await runtime.pull(image)
    s = replace(
        settings(tmp_path),
        runtime="gvisor",
        slot_cpu_millis=1000,
        slot_memory_bytes=512 << 20,
        slot_pids=1024,  # the default pids limit: a kind of None, as a request of 1024 reads
    )
    m = SandboxManager(runtime, s)
    await m.start()
    try:
        await until(lambda: ready(m) == 1, "the pinned slot")
        other = replace(req("sb-1"), cpu_millis=500, memory_bytes=512 << 20, pids_limit=1024)
        assert not (await m.create(other)).warm
        defaults = replace(req("sb-2"), cpu_millis=1000, memory_bytes=512 << 20, pids_limit=1024)
        assert (await m.create(defaults)).warm
    finally:
        await m.aclose()
