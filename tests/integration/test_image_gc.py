"""The image collector against real containerd: over budget, the least recently used image
goes; the one a container stands on and a pinned (prewarm) one stay, and the container keeps
running."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from pathlib import Path

import pytest

from fastsandbox.agent.runtime.base import ContainerSpec, ContainerStatus
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.janitor.containerd import ContainerdLeftovers
from fastsandbox.janitor.images import ImageCollector, cache_bytes
from tests.infra import ContainerdProc

pytestmark = pytest.mark.integration

NS = "fsb-image-gc"


@pytest.fixture
async def tagged(
    containerd: ContainerdProc, demo_image: str, tmp_path: Path
) -> AsyncIterator[tuple[ContainerdRuntime, ContainerdLeftovers, list[str]]]:
    runtime = ContainerdRuntime(
        containerd.socket, NS, [demo_image.split("/", 1)[0]], state_dir=tmp_path
    )
    leftovers = ContainerdLeftovers(containerd.socket, NS)
    base = (await runtime.pull(demo_image)).name
    names = [base]
    for tag in ("gc-unused", "gc-pinned"):
        name = base.rsplit(":", 1)[0] + f":{tag}"
        containerd.ctr("images", "tag", "--force", base, name, namespace=NS)
        names.append(name)
    try:
        yield runtime, leftovers, names
    finally:
        for name in names:
            containerd.ctr("images", "rm", name, namespace=NS, check=False)
        await leftovers.close()
        await runtime.close()


async def test_lru_images_go_but_not_one_in_use_or_pinned(
    tagged: tuple[ContainerdRuntime, ContainerdLeftovers, list[str]],
    cgroup_parent: str,
    tmp_path: Path,
) -> None:
    runtime, leftovers, (used, unused, pinned) = tagged

    async def pins() -> Collection[str]:
        return [pinned]

    spec = ContainerSpec(
        id="gc-user",
        image=used,
        log_path=str(tmp_path / "gc.log"),
        command=("sleep", "600"),
        cgroup_parent=cgroup_parent,
    )
    await runtime.create(spec)
    try:
        images = await leftovers.cached_images()
        assert {i.name for i in images} >= {used, unused, pinned}
        assert cache_bytes([i for i in images if i.name == used]) > 0
        collector = ImageCollector(leftovers, budget_bytes=1, pinned=pins)
        assert await collector.collect() == [unused]
        left = {i.name for i in await runtime.images()}
        assert used in left and pinned in left and unused not in left
        assert (await runtime.get(spec.id)).status is ContainerStatus.RUNNING
    finally:
        await runtime.delete(spec.id, 0)
    # Nothing uses it any more: now it may go too; the pinned one still stays.
    assert await collector.collect() == [used]
    assert {i.name for i in await runtime.images()} == {pinned}
