"""A claimed warm slot is answered before containerd has its record (runtime/claim_records.py):
real containerd, runc and fsb-supervisor, the agent's manager in this process.

- Until the record is written, the agent's reads show the sandbox (Status, get, what an exec
  inherits), never a warm slot, while containerd itself still holds the slot's record.
- An agent gone before the record was written (here: containerd refused the write, so the
  entry is what is left, as after a kill -9 in between) finds the sandbox after its restart: the
  journal is replayed before anything is read, the container gets the sandbox's record, is never
  removed as a stale warm slot, and its main process still runs.
- Nothing is left: the entry goes with the record, the sandbox and slots with the test.
Bounds below only stop a hung test; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from fastsandbox.agent.manager import SandboxManager
from fastsandbox.agent.requests import SandboxRequest
from fastsandbox.agent.runtime.base import ContainerStatus
from fastsandbox.agent.runtime.claim_records import unrecorded
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.api.images import normalize_image_ref
from fastsandbox.api.labels import AGENT_LABEL, SANDBOX_ID_LABEL, WARM_SLOT_LABEL
from fastsandbox.errors import RuntimeFailure
from fastsandbox.settings import AgentSettings
from tests.infra import ContainerdProc, RegistryProc
from tests.integration.test_agent_exec import supervisor_binary

pytestmark = pytest.mark.integration

NS = "fastsandbox"
BOUND = 60.0


def _settings(
    tmp_path: Path, containerd: ContainerdProc, registry: RegistryProc, cgroup_parent: str,
    image: str,
) -> AgentSettings:  # fmt: skip
    name = f"it-journal-{uuid.uuid4().hex[:8]}"
    return AgentSettings(
        name=name,
        pool="p",
        namespace="default",
        listen=f"unix://{tmp_path}/a.sock",
        state_dir=tmp_path / "agent",
        containerd_socket=containerd.socket,
        containerd_namespace=NS,
        cgroup_parent=cgroup_parent,
        insecure_registries=[registry.addr],
        capacity=3,
        init_path=supervisor_binary(),
        warm_slots=1,
        warm_images=(image,),
        warm_recent=0,
        delete_grace_seconds=0,
    )


def _runtime(containerd: ContainerdProc, registry: RegistryProc, settings: AgentSettings) -> Any:
    return ContainerdRuntime(
        containerd.socket, NS, [registry.addr], state_dir=settings.state_dir / "runtime"
    )


async def _slot_ready(manager: SandboxManager) -> None:
    deadline = time.monotonic() + BOUND
    assert manager.warm is not None
    while not manager.warm.ready_ids():
        if time.monotonic() > deadline:
            pytest.fail("no warm slot became ready")
        await asyncio.sleep(0.05)


async def test_a_claim_answered_before_its_record_survives_an_agent_restart(
    containerd: ContainerdProc,
    registry: RegistryProc,
    cgroup_parent: str,
    tmp_path: Path,
    demo_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = normalize_image_ref(demo_image)
    settings = _settings(tmp_path, containerd, registry, cgroup_parent, image)
    journal = settings.state_dir / "runtime" / "claims"
    runtime = _runtime(containerd, registry, settings)
    again_runtime = _runtime(containerd, registry, settings)
    # A reader of containerd itself (as the janitor is), with no claim of its own in flight.
    outside = ContainerdRuntime(containerd.socket, NS, state_dir=tmp_path / "outside")
    first = SandboxManager(runtime, settings)
    again: SandboxManager | None = None
    closed: list[SandboxManager] = []
    try:
        await first.start()
        await _slot_ready(first)

        # containerd refuses the record: what a kill -9 right after the answer leaves behind.
        async def refused(*_: object) -> None:
            raise RuntimeFailure("record refused (test)")

        monkeypatch.setattr(runtime._api, "update_container", refused)
        req = SandboxRequest(
            sandbox_id="it-journal-1",
            image=demo_image,
            command=("sleep", "600"),
            env=(("V", "world"),),
            working_dir="/srv",
        )
        state = await first.create(req)
        assert state.warm
        cid = first._container_id("it-journal-1")
        await asyncio.sleep(0.2)  # the refused write has run
        assert set(unrecorded(journal)) == {cid}
        # containerd still holds the slot's record; the agent shows the sandbox.
        raw = await outside.get(cid)
        assert WARM_SLOT_LABEL in raw.labels and SANDBOX_ID_LABEL not in raw.labels
        got = await first.get("it-journal-1")
        assert got.status is ContainerStatus.RUNNING
        assert got.labels[SANDBOX_ID_LABEL] == "it-journal-1"
        assert WARM_SLOT_LABEL not in got.labels
        status = await first.status()
        assert [s.labels.get(SANDBOX_ID_LABEL) for s in status.sandboxes] == ["it-journal-1"]
        defaults = await runtime.process_defaults(cid)
        assert ("V=world" in defaults.env, defaults.cwd) == (True, "/srv")

        # The agent goes (its sandboxes and slots stay with containerd's shims).
        monkeypatch.undo()
        await first.aclose()
        closed.append(first)

        again = SandboxManager(again_runtime, settings)
        await again.start()
        recorded = await outside.get(cid)
        assert recorded.labels[SANDBOX_ID_LABEL] == "it-journal-1"
        assert WARM_SLOT_LABEL not in recorded.labels
        assert recorded.status is ContainerStatus.RUNNING
        assert not unrecorded(journal)
        assert (await again.get("it-journal-1")).status is ContainerStatus.RUNNING
        defaults = await again_runtime.process_defaults(cid)
        assert ("V=world" in defaults.env, defaults.cwd) == (True, "/srv")
        await _slot_ready(again)  # a fresh slot; the sandbox was not taken for one
        assert cid not in (again.warm.ready_ids() if again.warm else set())

        # A claim recorded normally leaves no entry either.
        second = await again.create(
            SandboxRequest(sandbox_id="it-journal-2", image=demo_image, command=("sleep", "600"))
        )
        assert second.warm
        cid2 = again._container_id("it-journal-2")
        deadline = time.monotonic() + BOUND
        while SANDBOX_ID_LABEL not in (await outside.get(cid2)).labels:
            assert time.monotonic() < deadline, "the record was never written"
            await asyncio.sleep(0.01)
        while unrecorded(journal):
            assert time.monotonic() < deadline, "the entry was never removed"
            await asyncio.sleep(0.01)
        assert await again.delete("it-journal-2")
        assert await again.delete("it-journal-1")
    finally:
        for manager in (again, first):
            if manager is not None and manager not in closed:
                await manager.aclose()
        for state in await outside.list({AGENT_LABEL: settings.name}):
            await outside.delete(state.id, 0)
        for rt in (runtime, again_runtime, outside):
            await rt.close()
