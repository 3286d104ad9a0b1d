"""The janitor against a real containerd: an orphan goes (container, task, snapshot, log file), a
recorded sandbox stays, a stale snapshot goes, and another server's containers are left alone."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fastsandbox.agent.runtime.base import ContainerSpec, ContainerStatus
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.api.labels import AGENT_LABEL, SANDBOX_ID_LABEL
from fastsandbox.errors import NotFound
from fastsandbox.janitor.containerd import ContainerdLeftovers
from fastsandbox.janitor.janitor import Janitor, ScanReport
from fastsandbox.janitor.scanner import Reason
from tests.infra import ContainerdProc

pytestmark = pytest.mark.integration

NS = "fastsandbox"
TIMEOUT = 1.5


class Known:
    def __init__(self, live: set[str], recorded: set[str]) -> None:
        self.live, self.recorded = live, recorded

    async def live_agents(self) -> set[str]:
        return set(self.live)

    async def recorded_container_ids(self) -> set[str]:
        return set(self.recorded)


@pytest.fixture
async def runtime(
    containerd: ContainerdProc, demo_image: str, tmp_path: Path
) -> AsyncIterator[ContainerdRuntime]:
    rt = ContainerdRuntime(
        containerd.socket, NS, [demo_image.split("/", 1)[0]], state_dir=tmp_path / "rt"
    )
    await rt.pull(demo_image)
    try:
        yield rt
    finally:
        await rt.close()


@pytest.fixture
async def leftovers(containerd: ContainerdProc) -> AsyncIterator[ContainerdLeftovers]:
    lo = ContainerdLeftovers(containerd.socket, NS)
    try:
        yield lo
    finally:
        await lo.close()


def snapshots(containerd: ContainerdProc) -> set[str]:
    lines = containerd.ctr("snapshots", "ls").splitlines()[1:]
    return {line.split()[0] for line in lines if line.strip()}


def containers(containerd: ContainerdProc) -> set[str]:
    return set(containerd.ctr("containers", "ls", "-q").split())


async def test_janitor_removes_an_orphan_and_keeps_a_recorded_sandbox(
    runtime: ContainerdRuntime,
    leftovers: ContainerdLeftovers,
    containerd: ContainerdProc,
    demo_image: str,
    cgroup_parent: str,
    tmp_path: Path,
) -> None:
    tag = secrets.token_hex(3)
    agent, foreign_agent = f"jan-agent-{tag}", f"other-server-{tag}"
    agents_dir = tmp_path / "agents"
    orphan, recorded, foreign = f"jan-orphan-{tag}", f"jan-rec-{tag}", f"jan-foreign-{tag}"
    stale_snapshot = f"jan-stale-{tag}"

    def spec(cid: str, owner: str, log_dir: Path) -> ContainerSpec:
        return ContainerSpec(
            id=cid,
            image=demo_image,
            log_path=str(log_dir / f"{cid}.log"),
            command=("sleep", "300"),
            labels={AGENT_LABEL: owner, SANDBOX_ID_LABEL: cid},
            cgroup_parent=cgroup_parent,
        )

    log_dir = agents_dir / agent / "logs"
    try:
        for cid in (orphan, recorded):
            await runtime.create(spec(cid, agent, log_dir))
        await runtime.create(spec(foreign, foreign_agent, tmp_path / "elsewhere"))
        chain = (await runtime.image_config(demo_image)).chain_id
        containerd.ctr("snapshots", "prepare", stale_snapshot, chain)
        assert (await leftovers.log_paths())[orphan] == str(log_dir / f"{orphan}.log")
        # Snapshot ages come from containerd (a zero time would make every snapshot "old").
        created = {x.key: x.created_at for x in await leftovers.snapshots()}
        assert time.time() - 120 < created[recorded] <= time.time() + 1

        janitor = Janitor(
            runtime,
            Known({agent}, {recorded}),
            orphan_timeout=TIMEOUT,
            interval=0.2,
            agents_dir=agents_dir,
            leftovers=leftovers,
            grace_seconds=0.5,
        )
        reports: list[ScanReport] = []
        async with asyncio.timeout(30):
            while (log_dir / f"{orphan}.log").exists() or stale_snapshot in snapshots(containerd):
                reports.append(await janitor.scan())
                await asyncio.sleep(0.2)

        assert any(r.removed == {orphan: Reason.NO_RECORD} for r in reports)
        assert reports[0].waiting == {orphan: Reason.NO_RECORD}  # not at once
        assert len(reports) >= 3
        assert orphan not in containers(containerd)
        assert orphan not in snapshots(containerd)
        assert orphan not in containerd.ctr("tasks", "ls")
        with pytest.raises(NotFound):
            await runtime.get(orphan)
        # The recorded sandbox survived every scan, running, with its log.
        assert (await runtime.get(recorded)).status is ContainerStatus.RUNNING
        assert (log_dir / f"{recorded}.log").exists()
        assert recorded in snapshots(containerd)
        # Another server's container is not ours: never waited on, never removed.
        assert all(foreign not in r.waiting and foreign not in r.removed for r in reports)
        assert (await runtime.get(foreign)).status is ContainerStatus.RUNNING
    finally:
        for cid in (orphan, recorded, foreign):
            await runtime.delete(cid, 0)
        containerd.ctr("snapshots", "rm", stale_snapshot, check=False)
