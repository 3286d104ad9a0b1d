"""The janitor's rules (the pure scanner) and the janitor itself over the in-memory runtime."""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from pathlib import Path

import pytest

from fastsandbox.agent.runtime.base import ContainerSpec
from fastsandbox.agent.runtime.fake import FakeRuntime
from fastsandbox.api.labels import SANDBOX_ID_LABEL, WARM_SLOT_LABEL
from fastsandbox.api.models import ObjectMeta, Sandbox, SandboxSpec
from fastsandbox.errors import RuntimeFailure
from fastsandbox.janitor.embedded import EmbeddedKnownState
from fastsandbox.janitor.janitor import Janitor, SnapshotSeen
from fastsandbox.janitor.scanner import AGENT_LABEL, Decision, Known, Reason, Seen, decide
from fastsandbox.store.memory import MemoryStore

IMAGE = "127.0.0.1:5000/busybox:latest"
TIMEOUT = 30.0


def seen(cid: str, agent: str = "a1", log_path: str | None = None) -> Seen:
    return Seen(cid, {AGENT_LABEL: agent}, log_path)


def known(
    live: Collection[str] = ("a1",),
    recorded: Collection[str] = (),
    in_flight: Collection[str] = (),
    our_agents: Collection[str] = (),
    agents_dir: str | None = None,
) -> Known:
    return Known(
        live_agents=frozenset(live),
        recorded=frozenset(recorded),
        in_flight=frozenset(in_flight),
        our_agents=frozenset(our_agents),
        agents_dir=agents_dir,
    )


def scans(
    containers: list[Seen],
    states: list[tuple[float, Known]],
    in_flight_timeout: float | None = None,
) -> list[Decision]:
    """Run `decide` at each (time, known), carrying the clocks like the janitor does."""
    since: dict[str, float] = {}
    out = []
    for now, k in states:
        d = decide(
            containers,
            k,
            since,
            orphan_timeout=TIMEOUT,
            now=now,
            in_flight_timeout=in_flight_timeout,
        )
        since = dict(d.orphaned_since)
        out.append(d)
    return out


def removed(d: Decision) -> dict[str, Reason]:
    return {r.id: r.reason for r in d.remove}


# -- scanner ---------------------------------------------------------------------------------
def test_a_recorded_container_is_never_removed() -> None:
    k = known(recorded={"c1"})
    for d in scans([seen("c1")], [(t, k) for t in (0, 31, 1000, 10**6)]):
        assert not d.remove and not d.waiting


def test_an_in_flight_container_is_never_removed() -> None:
    k = known(in_flight={"c1"})
    for d in scans([seen("c1")], [(t, k) for t in (0, 31, 1000, 10**6)]):
        assert not d.remove


def test_a_stuck_in_flight_slot_shields_only_until_the_in_flight_timeout() -> None:
    k = known(in_flight={"c1"})
    ds = scans([seen("c1")], [(0, k), (299, k), (300, k)], in_flight_timeout=300.0)
    assert [removed(d) for d in ds] == [{}, {}, {"c1": Reason.NO_RECORD}]
    # The in-flight limit never makes a removal sooner than the orphan timeout.
    ds = scans([seen("c1")], [(0, k), (10, k), (30, k)], in_flight_timeout=5.0)
    assert [removed(d) for d in ds] == [{}, {}, {"c1": Reason.NO_RECORD}]


def test_warm_slots_belong_to_their_live_agent_and_claimed_ones_to_their_record() -> None:
    slot = Seen("w-1", {AGENT_LABEL: "a1", WARM_SLOT_LABEL: IMAGE})
    claimed = Seen("w-2", {AGENT_LABEL: "a1", SANDBOX_ID_LABEL: "sb-2"})
    unclaimed_record = Seen("w-3", {AGENT_LABEL: "a1", SANDBOX_ID_LABEL: "sb-3"})
    k = known(recorded={"sb-2"}, in_flight={"sb-4"})
    for d in scans([slot, claimed], [(t, k) for t in (0, 31, 10**6)]):
        assert not d.remove and not d.waiting
    # Records know a claimed slot by its sandbox id; without a record it is an orphan.
    ds = scans([unclaimed_record], [(0, k), (31, k)])
    assert removed(ds[1]) == {"w-3": Reason.NO_RECORD}
    # A create in flight is known by its sandbox id too.
    in_flight = Seen("w-4", {AGENT_LABEL: "a1", SANDBOX_ID_LABEL: "sb-4"})
    assert not removed(scans([in_flight], [(0, k), (31, k)])[1])
    # Its agent gone, a slot is an orphan like any container.
    gone = known(live=set(), our_agents={"a1"})
    assert removed(scans([slot], [(0, gone), (31, gone)])[1]) == {"w-1": Reason.AGENT_GONE}


def test_an_unrecorded_container_is_removed_after_the_timeout_not_before() -> None:
    k = known()
    ds = scans([seen("c1")], [(100, k), (110, k), (129.9, k), (130, k)])
    assert [removed(d) for d in ds] == [{}, {}, {}, {"c1": Reason.NO_RECORD}]
    assert ds[1].waiting == {"c1": Reason.NO_RECORD}
    assert ds[3].remove[0].orphaned_for == 30


def test_a_container_whose_agent_is_gone_is_removed_after_the_timeout() -> None:
    # Recorded, but its agent is gone (seen live before, so the container is ours).
    before = known(live={"a1"}, recorded={"c1"})
    after = known(live=set(), recorded={"c1"}, our_agents={"a1"})
    ds = scans([seen("c1")], [(0, before), (5, after), (34, after), (35, after)])
    assert [removed(d) for d in ds] == [{}, {}, {}, {"c1": Reason.AGENT_GONE}]


def test_the_orphan_clock_restarts_when_a_record_appears() -> None:
    orphan, recorded = known(), known(recorded={"c1"})
    ds = scans(
        [seen("c1")],
        [(0, orphan), (20, recorded), (25, orphan), (50, orphan), (55, orphan)],
    )
    assert [removed(d) for d in ds] == [{}, {}, {}, {}, {"c1": Reason.NO_RECORD}]
    assert ds[1].orphaned_since == {}
    assert ds[2].orphaned_since == {"c1": 25}


def test_the_orphan_clock_restarts_while_in_flight() -> None:
    orphan, flying = known(), known(in_flight={"c1"})
    ds = scans([seen("c1")], [(0, orphan), (29, flying), (31, orphan)], in_flight_timeout=None)
    # In flight keeps its clock running but is protected; then the orphan clock applies again.
    assert [removed(d) for d in ds] == [{}, {}, {"c1": Reason.NO_RECORD}]


def test_containers_of_unknown_agents_are_not_ours_and_never_touched() -> None:
    k = known(live={"a1"}, agents_dir="/data/agents")
    foreign = [seen("x1", agent="other-server-agent"), Seen("x2", {}, "/elsewhere/x2.log")]
    ds = scans(foreign, [(0, k), (1000, k)])
    assert not ds[1].remove and not ds[1].waiting
    assert set(ds[1].foreign) == {"x1", "x2"}


def test_a_log_under_our_agents_dir_makes_a_container_ours() -> None:
    k = known(live={"a1"}, agents_dir="/data/agents")
    c = seen("c1", agent="stopped-agent", log_path="/data/agents/stopped-agent/logs/c1.log")
    ds = scans([c], [(0, k), (30, k)])
    assert removed(ds[1]) == {"c1": Reason.AGENT_GONE}


def test_only_orphans_are_picked_among_many() -> None:
    k = known(live={"a1", "a2"}, recorded={"r1", "r2"}, in_flight={"f1"})
    containers = [
        seen("r1"),
        seen("r2", "a2"),
        seen("f1"),
        seen("o1"),
        seen("o2", "a2"),
        seen("g1", "gone"),
    ]
    k_then = known(live={"a1", "a2"}, recorded={"r1", "r2"}, in_flight={"f1"}, our_agents={"gone"})
    ds = scans(containers, [(0, k_then), (30, k)])
    assert removed(ds[1]) == {"o1": Reason.NO_RECORD, "o2": Reason.NO_RECORD}
    # "gone" is no longer among our agents in the second scan: not ours, left alone.
    assert ds[1].foreign == ("g1",)


# -- janitor over the fake runtime -----------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Known_:
    def __init__(self, live: set[str], recorded: set[str] | None = None) -> None:
        self.live = live
        self.recorded = recorded or set()

    async def live_agents(self) -> set[str]:
        return set(self.live)

    async def recorded_container_ids(self) -> set[str]:
        return set(self.recorded)


class Leftovers:
    def __init__(self, snapshots: list[SnapshotSeen], containers: set[str]) -> None:
        self.snaps = snapshots
        self.containers = containers
        self.removed: list[str] = []

    async def log_paths(self) -> dict[str, str]:
        return {}

    async def container_ids(self) -> set[str]:
        return set(self.containers)

    async def snapshots(self) -> list[SnapshotSeen]:
        return [s for s in self.snaps if s.key not in self.removed]

    async def remove_snapshot(self, key: str) -> None:
        self.removed.append(key)


async def make(rt: FakeRuntime, tmp_path: Path, cid: str, agent: str = "a1") -> None:
    await rt.pull(IMAGE)
    await rt.create(
        ContainerSpec(
            id=cid,
            image=IMAGE,
            log_path=str(tmp_path / "agents" / agent / "logs" / f"{cid}.log"),
            labels={AGENT_LABEL: agent, "fastsandbox.io/managed": "true"},
        )
    )


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


async def test_janitor_removes_an_orphan_after_the_timeout_and_calls_the_hook(
    tmp_path: Path,
) -> None:
    rt, clock, hooked = FakeRuntime(), Clock(), []
    await make(rt, tmp_path, "orphan")
    await make(rt, tmp_path, "live")
    j = Janitor(
        rt,
        Known_({"a1"}, {"live"}),
        orphan_timeout=TIMEOUT,
        interval=1,
        on_removed=hooked.append,
        agents_dir=tmp_path / "agents",
        clock=clock,
    )
    first = await j.scan()
    assert first.waiting == {"orphan": Reason.NO_RECORD} and not first.removed
    clock.now += 29
    assert not (await j.scan()).removed
    clock.now += 1
    report = await j.scan()
    assert report.removed == {"orphan": Reason.NO_RECORD}
    assert hooked == ["orphan"]
    assert [s.id for s in await rt.list()] == ["live"]
    assert rt.delete_graces["orphan"] == j.grace_seconds
    # The removed container's log goes once it is old; the live one's never.
    log_dir = tmp_path / "agents" / "a1" / "logs"
    age(log_dir / "orphan.log", TIMEOUT + 1)
    age(log_dir / "live.log", TIMEOUT + 1)
    channels = tmp_path / "agents" / "a1" / "channels"
    for sid in ("orphan", "live"):
        (channels / sid).mkdir(parents=True)
        age(channels / sid, TIMEOUT + 1)
    # The older half of a capped log goes with it.
    for name in ("orphan.log.1", "live.log.1"):
        (log_dir / name).write_bytes(b"older\n")
    age(log_dir / "orphan.log.1", TIMEOUT + 1)
    age(log_dir / "live.log.1", TIMEOUT + 1)
    report = await j.scan()
    assert sorted(report.logs_removed) == [
        str(channels / "orphan"),
        str(log_dir / "orphan.log"),
        str(log_dir / "orphan.log.1"),
    ]
    assert (log_dir / "live.log").exists() and (log_dir / "live.log.1").exists()
    assert (channels / "live").is_dir() and not (channels / "orphan").exists()


async def test_janitor_keeps_a_container_whose_record_lands_in_time(tmp_path: Path) -> None:
    rt, clock = FakeRuntime(), Clock()
    await make(rt, tmp_path, "fast")
    state = Known_({"a1"})
    j = Janitor(rt, state, orphan_timeout=TIMEOUT, interval=1, clock=clock)
    await j.scan()
    state.recorded.add("fast")  # Fast mode: the record is written just after the start
    for _ in range(5):
        clock.now += TIMEOUT
        assert not (await j.scan()).removed
    assert [s.id for s in await rt.list()] == ["fast"]


async def test_janitor_never_removes_a_container_in_flight(tmp_path: Path) -> None:
    rt, clock = FakeRuntime(), Clock()
    await make(rt, tmp_path, "creating")
    j = Janitor(
        rt,
        Known_({"a1"}),
        orphan_timeout=TIMEOUT,
        interval=1,
        in_flight=lambda: {"creating"},
        in_flight_timeout=None,
        clock=clock,
    )
    for _ in range(5):
        assert not (await j.scan()).removed
        clock.now += TIMEOUT
    assert [s.id for s in await rt.list()] == ["creating"]


async def test_janitor_removes_containers_of_a_gone_agent(tmp_path: Path) -> None:
    rt, clock = FakeRuntime(), Clock()
    await make(rt, tmp_path, "c1", agent="dead")
    state = Known_({"dead"}, {"c1"})
    j = Janitor(rt, state, orphan_timeout=TIMEOUT, interval=1, clock=clock)
    assert not (await j.scan()).waiting
    state.live = {"other"}
    assert (await j.scan()).waiting == {"c1": Reason.AGENT_GONE}
    clock.now += TIMEOUT
    assert (await j.scan()).removed == {"c1": Reason.AGENT_GONE}


async def test_janitor_retries_a_failed_removal(tmp_path: Path) -> None:
    class Flaky(FakeRuntime):
        fail = True

        async def delete(self, container_id: str, grace_seconds: float) -> bool:
            if self.fail:
                raise RuntimeFailure("shim wedged")
            return await super().delete(container_id, grace_seconds)

    rt, clock, hooked = Flaky(), Clock(), []
    await make(rt, tmp_path, "o")
    j = Janitor(
        rt, Known_({"a1"}), orphan_timeout=0, interval=1, on_removed=hooked.append, clock=clock
    )
    report = await j.scan()
    assert report.errors == 1 and not report.removed and not hooked
    rt.fail = False
    assert (await j.scan()).removed == {"o": Reason.NO_RECORD}
    assert hooked == ["o"]


async def test_janitor_removes_old_unreferenced_sandbox_snapshots_only() -> None:
    old, new = time.time() - TIMEOUT - 1, time.time()
    leftovers = Leftovers(
        [
            SnapshotSeen("stale-1", active=True, created_at=old),
            SnapshotSeen("fresh-1", active=True, created_at=new),
            SnapshotSeen("used-1", active=True, created_at=old),
            SnapshotSeen("flying-1", active=True, created_at=old),
            SnapshotSeen("sha256:" + "a" * 64, active=False, created_at=old),
            SnapshotSeen("extract-1 sha256:x", active=True, created_at=old),
        ],
        containers={"used-1"},
    )
    j = Janitor(
        FakeRuntime(),
        Known_({"a1"}),
        orphan_timeout=TIMEOUT,
        interval=1,
        leftovers=leftovers,
        in_flight=lambda: {"flying-1"},
    )
    report = await j.scan()
    assert report.snapshots_removed == ["stale-1"]
    assert leftovers.removed == ["stale-1"]


async def test_janitor_removes_fifos_of_containers_it_removed(tmp_path: Path) -> None:
    rt, clock = FakeRuntime(), Clock()
    await make(rt, tmp_path, "o")
    fifo_dir = tmp_path / "fifo"
    (fifo_dir / "123").mkdir(parents=True)
    (fifo_dir / "456").mkdir(parents=True)
    for name in ("o-stdin", "o-stdout", "o-stderr"):
        os.mkfifo(fifo_dir / "123" / name)
    os.mkfifo(fifo_dir / "456" / "someone-else-stdout")
    j = Janitor(rt, Known_({"a1"}), orphan_timeout=0, interval=1, fifo_dir=fifo_dir, clock=clock)
    report = await j.scan()
    assert report.removed == {"o": Reason.NO_RECORD}
    assert len(report.fifos_removed) == 3
    assert not (fifo_dir / "123").exists()
    assert (fifo_dir / "456" / "someone-else-stdout").exists()


async def test_janitor_run_loops_until_cancelled(tmp_path: Path) -> None:
    import asyncio

    rt = FakeRuntime()
    await make(rt, tmp_path, "o")
    j = Janitor(rt, Known_({"a1"}), orphan_timeout=0, interval=0.01)
    task = asyncio.create_task(j.run())
    try:
        async with asyncio.timeout(5):
            while await rt.list():
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# -- embedded known state --------------------------------------------------------------------
async def test_embedded_state_tells_adopted_orphans_from_creates_in_flight() -> None:
    store = MemoryStore()
    sb = Sandbox(
        metadata=ObjectMeta(name="s", namespace="default"),
        spec=SandboxSpec(image=IMAGE, pool_ref="p"),
    )
    sb.status.container_id = "rec-1"
    await store.create(sb)
    slots = {"rec-1", "orphan-1"}
    released: list[str] = []

    def release(sid: str) -> None:
        released.append(sid)
        slots.discard(sid)

    state = EmbeddedKnownState(
        store, agents=lambda: ["a1"], held=lambda: sorted(slots), release=release
    )
    assert await state.recorded_container_ids() == {"rec-1"}
    assert await state.live_agents() == {"a1"}
    await state.prime()  # after recovery: orphan-1 holds a slot without a record
    slots.add("new-1")  # a create takes its slot after that
    assert state.in_flight() == {"rec-1", "new-1"}
    state.removed("orphan-1")
    assert released == ["orphan-1"]
    assert state.in_flight() == {"rec-1", "new-1"}


async def test_a_writable_layer_without_its_container_goes_once_old(tmp_path: Path) -> None:
    """Files only (no mount here): the layer of a removal cut short, next to a live one."""
    rt, clock = FakeRuntime(), Clock()
    await make(rt, tmp_path, "live")
    disks = tmp_path / "agents" / "a1" / "runtime" / "disks"
    for sid in ("live", "gone", "fresh"):
        (disks / sid / "upper").mkdir(parents=True)
        (disks / f"{sid}.img").write_bytes(b"")
    for sid in ("live", "gone"):
        age(disks / f"{sid}.img", TIMEOUT + 1)
    j = Janitor(
        rt,
        Known_({"a1"}, {"live"}),
        orphan_timeout=TIMEOUT,
        interval=1,
        agents_dir=tmp_path / "agents",
        clock=clock,
    )
    report = await j.scan()
    assert report.layers_removed == [str(disks / "gone")]
    assert not (disks / "gone").exists() and not (disks / "gone.img").exists()
    assert (disks / "live.img").exists() and (disks / "fresh.img").exists()


async def test_spare_layer_images_an_agent_left_go_once_old(tmp_path: Path) -> None:
    """Spares (agent/runtime/spare_layers.py: formatted images, or a format's template dir) of
    an agent that died: old ones go, a fresh one (a live agent's, being made) stays."""
    from fastsandbox.agent.runtime.spare_layers import SPARE_PREFIX

    rt, clock = FakeRuntime(), Clock()
    disks = tmp_path / "agents" / "a1" / "runtime" / "disks"
    disks.mkdir(parents=True)
    old_image, old_dir, fresh = (
        disks / f"{SPARE_PREFIX}1-a.img",
        disks / f"{SPARE_PREFIX}1-b",
        disks / f"{SPARE_PREFIX}1-c.img",
    )
    old_image.write_bytes(b"")
    (old_dir / "lost+found").mkdir(parents=True)
    fresh.write_bytes(b"")
    age(old_image, TIMEOUT + 1)
    age(old_dir, TIMEOUT + 1)
    j = Janitor(
        rt,
        Known_({"a1"}, set()),
        orphan_timeout=TIMEOUT,
        interval=1,
        agents_dir=tmp_path / "agents",
        clock=clock,
    )
    report = await j.scan()
    assert sorted(report.layers_removed) == sorted([str(old_image), str(old_dir)])
    assert not old_image.exists() and not old_dir.exists() and fresh.exists()
