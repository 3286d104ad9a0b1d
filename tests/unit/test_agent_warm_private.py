"""Warm slots in a private pool: each slot made in a network of its own, handed to the sandbox
that claims it (ports published, labels recorded), released when the slot goes (retire, a
restarted agent), and counted against the network's addresses and host ports.

The runtime is the fake with a real waiting supervisor per slot (tests/unit/test_agent_warm.py);
the network is the real `PrivateNetwork` driving a runner that records its commands and keeps
`ip netns add/delete` as files, so what exists can be read back (the real commands run in
tests/integration/test_warm_slots.py and tests/e2e/test_private_network.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from fastsandbox.agent.manager import SandboxManager
from fastsandbox.agent.network.private import INDEX_LABEL, PUBLISHED_LABEL, PrivateNetwork
from fastsandbox.agent.requests import SandboxRequest
from fastsandbox.errors import CapacityExhausted, RuntimeFailure
from fastsandbox.settings import AgentSettings
from tests.unit.supervisor_fixtures import supervisor_bin  # noqa: F401 - fixture
from tests.unit.test_agent_warm import HOT, OTHER, SupervisedFake, ready, settings, until


class Netns:
    """A `Runner`: records every command; `ip netns add/delete NAME` make/remove a file."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.calls: list[tuple[list[str], str | None]] = []

    async def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        self.calls.append((list(argv), stdin))
        if list(argv[:3]) == ["ip", "netns", "add"]:
            (self.dir / argv[3]).touch()
        elif list(argv[:3]) == ["ip", "netns", "delete"]:
            (self.dir / argv[3]).unlink()
        elif "-C" in argv:
            raise RuntimeFailure("no such rule")  # so the jump is inserted
        return ""

    def names(self) -> set[str]:
        return {p.name for p in self.dir.iterdir()}

    def dnat(self, op: str) -> list[str]:
        return [
            line for _, stdin in self.calls for line in (stdin or "").splitlines()
            if line.startswith(op) and "DNAT" in line and "--dport" in line
        ]  # fmt: skip


def private_settings(
    tmp_path: Path, *, capacity: int = 3, subnet: str = "10.211.0.0/24", ports: int = 100
) -> AgentSettings:
    agent_ns = tmp_path / "agent-ns"
    agent_ns.touch()
    return dataclasses.replace(
        settings(tmp_path, capacity),
        network_mode="private",
        netns_path=str(agent_ns),
        sandbox_subnet=subnet,
        port_range=(20000, 20000 + ports - 1),
    )


def make_manager(runtime: SupervisedFake, s: AgentSettings, runner: Netns) -> SandboxManager:
    m = SandboxManager(runtime, s)
    assert m.network is not None
    m.network = PrivateNetwork(
        m.network.cfg, runner=runner, ready=1, netns_dir=runner.dir, require_root=False
    )
    return m


@pytest.fixture
async def runtime(supervisor_bin: Path) -> AsyncIterator[SupervisedFake]:  # noqa: F811
    rt = SupervisedFake(supervisor_bin)
    for image in (HOT, OTHER):
        await rt.pull(image)
    yield rt
    rt.close_all()


@pytest.fixture
def runner(tmp_path: Path) -> Netns:
    d = tmp_path / "netns"
    d.mkdir()
    return Netns(d)


def req(sid: str, image: str = HOT, ports: tuple[int, ...] = ()) -> SandboxRequest:
    return SandboxRequest(sandbox_id=sid, image=image, command=("sleep", "30"), exposed_ports=ports)


def slot_ids(runtime: SupervisedFake) -> set[str]:
    """Unclaimed slots that exist (each has its waiting supervisor until removed)."""
    return set(runtime.procs) - set(runtime.claims)


async def test_a_slot_has_its_own_network_and_a_claim_publishes_into_it(
    runtime: SupervisedFake, runner: Netns, tmp_path: Path
) -> None:
    m = make_manager(runtime, private_settings(tmp_path), runner)
    await m.start()
    try:
        await until(lambda: ready(m) == 1, "a warm slot")
        (slot,) = slot_ids(runtime)
        net = m.network.get(slot) if m.network else None
        assert net is not None and net.path == str(runner.dir / net.netns)
        # Made in its own namespace (never the agent's), its index recorded for adoption.
        spec = runtime.specs[slot]
        assert spec.netns_path == net.path
        assert spec.labels[INDEX_LABEL] == str(net.index)
        claimed = await m.create(req("sb-w", ports=(8080,)))
        assert claimed.warm
        # The sandbox's labels are a cold create's: its index, its published host port.
        assert claimed.labels[INDEX_LABEL] == str(net.index)
        assert claimed.labels[PUBLISHED_LABEL] == "8080:20000"
        assert m.network is not None and m.network.get("sb-w") is net
        assert m.network.get(slot) is None
        assert any("fsb:sb-w:8080" in rule for rule in runner.dnat("-A"))
        # The refill's slot and a cold sandbox each get an address of their own.
        await until(lambda: ready(m) == 1, "the refill")
        cold = await m.create(req("sb-c", OTHER, ports=(8080,)))
        assert not cold.warm and cold.labels[PUBLISHED_LABEL] == "8080:20001"
        indexes = {s.labels[INDEX_LABEL] for s in runtime.specs.values()}
        assert len(indexes) == 3, runtime.specs
        # Delete: the DNAT rule (by the comment it was made with) and the namespace go.
        assert await m.delete("sb-w")
        assert any("fsb:sb-w:8080" in rule for rule in runner.dnat("-D"))
        assert net.netns not in runner.names() and m.network.get("sb-w") is None
    finally:
        await m.aclose()


async def test_slot_networks_are_released_on_retire_and_after_a_restart(
    runtime: SupervisedFake, runner: Netns, tmp_path: Path
) -> None:
    s = private_settings(tmp_path)
    m = make_manager(runtime, s, runner)
    await m.start()
    await until(lambda: ready(m) == 1, "a warm slot")
    first = next(iter(slot_ids(runtime)))
    assert m.network is not None
    first_ns = m.network.get(first).netns  # type: ignore[union-attr]
    m.cordon(True)  # retires the slot
    await until(lambda: not runtime.procs, "its removal")
    assert ["ip", "netns", "delete", first_ns] in [argv for argv, _ in runner.calls]
    assert m.network.get(first) is None
    m.cordon(False)
    await until(lambda: ready(m) == 1, "a slot again")
    await m.create(req("sb-w", ports=(8080,)))
    await until(lambda: ready(m) == 1, "the refill")
    (left,) = slot_ids(runtime)
    left_ns = m.network.get(left).netns  # type: ignore[union-attr]
    await m.aclose()  # the agent goes (as after a kill -9, its containers and namespaces stay)
    assert left_ns in runner.names()

    mark = len(runner.calls)
    again = make_manager(runtime, s, runner)
    await again.start()
    try:
        await until(lambda: left not in runtime.procs, "the old slot's removal")
        await until(lambda: ready(again) == 1, "a fresh slot")
        assert again.network is not None
        # The old slot's namespace was deleted (its name may be made again for a new one);
        # the claimed sandbox keeps its own.
        assert ["ip", "netns", "delete", left_ns] in [argv for argv, _ in runner.calls[mark:]]
        assert again.network.get(left) is None
        kept = again.network.get("sb-w")
        assert kept is not None and kept.netns in runner.names()
        assert kept.published == {8080: 20000}
        # Exactly: one per sandbox and live slot, one ready, nothing else.
        live = [again.network.get(c) for c in slot_ids(runtime) | {"sb-w"}]
        named = {n.netns for n in live if n is not None}
        assert len(named) == 2
        assert len(runner.names()) == len(named) + again.network.ready_count
        assert named <= runner.names()
    finally:
        await again.aclose()


async def test_no_host_port_left_refuses_the_create_and_keeps_the_slot(
    runtime: SupervisedFake, runner: Netns, tmp_path: Path
) -> None:
    m = make_manager(runtime, private_settings(tmp_path, ports=1), runner)
    await m.start()
    try:
        await until(lambda: ready(m) == 1, "a warm slot")
        assert (await m.create(req("sb-1", ports=(8080,)))).warm
        await until(lambda: ready(m) == 1, "the refill")
        (slot,) = slot_ids(runtime)
        with pytest.raises(CapacityExhausted, match="host port"):
            await m.create(req("sb-2", ports=(8080,)))
        # Nothing was made for it, and the slot is ready as it was, with its own network.
        assert ready(m) == 1 and slot_ids(runtime) == {slot}
        assert m.network is not None and m.network.get("sb-2") is None
        assert m.network.get(slot) is not None
        assert "sb-2" not in {s.id for s in (await m.status()).sandboxes}
        assert m.used_slots == 1
        # The port is back once sb-1 goes: the same slot serves the retried create.
        await m.delete("sb-1")
        again = await m.create(req("sb-2", ports=(8080,)))
        assert again.warm and slot in runtime.claims
    finally:
        await m.aclose()


async def test_slots_hold_addresses_and_give_one_up_for_a_create(
    runtime: SupervisedFake, runner: Netns, tmp_path: Path
) -> None:
    # 4 addresses (a /29 of /31s), capacity 6: addresses are what runs out.
    m = make_manager(
        runtime, private_settings(tmp_path, capacity=6, subnet="10.211.0.0/29"), runner
    )
    await m.start()
    try:
        await until(lambda: ready(m) == 1, "a warm slot")
        for i in range(4):  # the 4th address is the slot's: it is retired for it
            assert not (await m.create(req(f"sb-{i}", OTHER))).warm
        await until(lambda: not slot_ids(runtime), "the slot given up")
        with pytest.raises(CapacityExhausted, match="no sandbox address left"):
            await m.create(req("sb-4", OTHER))
        # No slot is made without an address (none half-made, nothing retried in a loop).
        await asyncio.sleep(0.2)
        assert ready(m) == 0 and not slot_ids(runtime)
        assert sorted(s.id for s in (await m.status()).sandboxes) == [f"sb-{i}" for i in range(4)]
        await m.delete("sb-0")
        await until(lambda: ready(m) == 1, "a slot in the address the delete gave back")
        assert len(runner.names()) == 4
    finally:
        await m.aclose()
