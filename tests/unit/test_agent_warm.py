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


async def test_pinned_slots_get_the_pools_default_limits_where_limits_are_fixed(
    runtime: SupervisedFake, tmp_path: Path
) -> None:
    """The control plane sends every create limits (the pool's defaults when it asks for
    none): under gVisor the pinned slot is made with them, so the first such create claims it."""
    await runtime.pull(HOT)
    limits = (1000, 512 << 20, 1024)
    s = replace(settings(tmp_path), runtime="gvisor", warm_limits=limits)
    m = SandboxManager(runtime, s)
    await m.start()
    try:
        await until(lambda: ready(m) == 1, "the pinned slot")
        assert m.warm is not None
        made = [spec for cid, spec in runtime.specs.items() if cid in m.warm.ready_ids()]
        assert [(x.cpu_millis, x.memory_bytes) for x in made] == [limits[:2]]
        asked = replace(req("sb-1"), cpu_millis=1000, memory_bytes=512 << 20, pids_limit=1024)
        assert (await m.create(asked)).warm
    finally:
        await m.aclose()
