"""A sandbox's writable layer has a real size limit (agent/runtime/disk.py), seen from inside:
writing past it fails with ENOSPC while the sandbox keeps running, a neighbour with a larger
limit writes the same amount unharmed, and delete leaves no mount, loop image or directory.

Both ways of mounting the layer: `agent` (the agent loop-mounts it, the embedded shape) and
`shim` (containerd's shim mounts it from the image the agent wrote, `containerd_state` set:
what an unprivileged Kubernetes agent Pod does)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fastsandbox.agent.runtime.base import ContainerSpec, ContainerStatus
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.errors import InvalidArgument, RuntimeFailure
from tests.infra import ContainerdProc

pytestmark = pytest.mark.integration

MiB = 1 << 20
# Writes 24 MiB, says how it went, then stays up so the test can see it still runs.
FILL = "dd if=/dev/zero of=/fill bs=1M count=24 2>&1; echo dd-exit=$?; echo alive; sleep 600"


@contextlib.asynccontextmanager
async def _disk_runtime(
    containerd: ContainerdProc, demo_image: str, tmp_path: Path, mode: str, spare_layers: int = 0
) -> AsyncIterator[ContainerdRuntime]:
    """`mode`: who mounts the layer, "agent" or "shim" (the Pod shape)."""
    rt = ContainerdRuntime(
        containerd.socket,
        "fsb-disk-test",
        [demo_image.split("/", 1)[0]],
        state_dir=tmp_path / "runtime",
        # tests/infra.py's containerd layout: state next to the socket.
        containerd_state=containerd.home / "state" if mode == "shim" else None,
        spare_layers=spare_layers,
    )
    await rt.pull(demo_image)
    try:
        yield rt
    finally:
        await rt.close()


@pytest.fixture(params=["agent", "shim"])
async def runtime(
    containerd: ContainerdProc, demo_image: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ContainerdRuntime]:
    async with _disk_runtime(containerd, demo_image, tmp_path, request.param) as rt:
        yield rt


async def _output_until(path: Path, needle: str, timeout: float = 60.0) -> str:
    async with asyncio.timeout(timeout):
        while True:
            text = path.read_text(errors="replace") if path.exists() else ""
            if needle in text:
                return text
            await asyncio.sleep(0.1)


async def test_writes_past_the_limit_fail_inside_and_the_neighbour_is_unaffected(
    runtime: ContainerdRuntime, demo_image: str, cgroup_parent: str, tmp_path: Path
) -> None:
    small = ContainerSpec(
        id="disk-small",
        image=demo_image,
        log_path=str(tmp_path / "small.log"),
        command=("sh", "-c", FILL),
        cgroup_parent=cgroup_parent,
        disk_bytes=8 * MiB,
    )
    big = ContainerSpec(
        id="disk-big",
        image=demo_image,
        log_path=str(tmp_path / "big.log"),
        command=("sh", "-c", FILL),
        cgroup_parent=cgroup_parent,
        disk_bytes=64 * MiB,
    )
    layers = tmp_path / "runtime" / "disks"
    try:
        await runtime.create(small)
        await runtime.create(big)
        small_out = await _output_until(Path(small.log_path), "alive")
        big_out = await _output_until(Path(big.log_path), "alive")
        assert "No space left on device" in small_out, small_out
        assert "dd-exit=1" in small_out, small_out
        assert "dd-exit=0" in big_out, big_out
        # The full sandbox keeps running: a full disk is its problem, not a crash.
        assert (await runtime.get(small.id)).status is ContainerStatus.RUNNING
        assert (await runtime.get(big.id)).status is ContainerStatus.RUNNING
        for sid in (small.id, big.id):
            assert (layers / sid).is_mount() or loop_devices_of(layers / f"{sid}.img"), sid
    finally:
        await runtime.delete(small.id, 0)
        await runtime.delete(big.id, 0)
    for sid in (small.id, big.id):
        assert not (layers / sid).exists()
        assert not (layers / f"{sid}.img").exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(layers) not in mounts
    assert "disk-small" not in mounts and "disk-big" not in mounts
    assert not loop_devices_of(layers), "a loop device outlived its sandbox"


@pytest.fixture(params=["agent", "shim"])
async def spare_runtime(
    containerd: ContainerdProc, demo_image: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ContainerdRuntime]:
    """A runtime keeping one spare layer per size (agent/runtime/spare_layers.py)."""
    async with _disk_runtime(containerd, demo_image, tmp_path, request.param, 1) as rt:
        yield rt


async def _spares_ready(runtime: ContainerdRuntime, size: int, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while runtime._layers.spares.count(size) < 1:
            await asyncio.sleep(0.05)


async def test_a_spare_layer_limits_the_same_and_nothing_outlives_the_runtime(
    spare_runtime: ContainerdRuntime, demo_image: str, cgroup_parent: str, tmp_path: Path
) -> None:
    layers = tmp_path / "runtime" / "disks"

    def spec(sid: str) -> ContainerSpec:
        return ContainerSpec(
            id=sid, image=demo_image, log_path=str(tmp_path / f"{sid}.log"),
            command=("sh", "-c", FILL), cgroup_parent=cgroup_parent, disk_bytes=8 * MiB,
        )  # fmt: skip

    # The first create of a size formats its own layer; the refill then makes a spare of it.
    await spare_runtime.create(spec("disk-first"))
    await spare_runtime.delete("disk-first", 0)
    await _spares_ready(spare_runtime, 8 * MiB)
    (spare,) = layers.glob(".spare-*.img")
    try:
        await spare_runtime.create(spec("disk-spare"))
        # It took the spare (renamed to its own image), and the limit holds as ever.
        assert not spare.exists()
        out = await _output_until(tmp_path / "disk-spare.log", "alive")
        assert "No space left on device" in out and "dd-exit=1" in out, out
        assert (await spare_runtime.get("disk-spare")).status is ContainerStatus.RUNNING
    finally:
        await spare_runtime.delete("disk-spare", 0)
    await _spares_ready(spare_runtime, 8 * MiB)
    await spare_runtime.close()
    # Closed: the spares are gone with it; no layer, mount or loop device is left.
    assert not layers.exists() or list(layers.iterdir()) == []
    assert str(layers) not in Path("/proc/self/mountinfo").read_text()
    assert not loop_devices_of(layers), "a loop device outlived its sandbox"


def loop_devices_of(path: Path) -> list[str]:
    """Loop devices whose backing file is `path` or under it."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(str(path)):
                found.append(backing.parent.parent.name)
    return found


async def test_a_failed_create_leaves_no_layer(
    runtime: ContainerdRuntime, demo_image: str, cgroup_parent: str, tmp_path: Path
) -> None:
    spec = ContainerSpec(
        id="disk-bad-cwd",
        image=demo_image,
        log_path="relative.log",  # refused before anything is made
        cgroup_parent=cgroup_parent,
        disk_bytes=8 * MiB,
    )
    with pytest.raises(InvalidArgument, match="absolute"):
        await runtime.create(spec)
    spec = ContainerSpec(
        id="disk-bad-runtime",
        image=demo_image,
        log_path=str(tmp_path / "x.log"),
        cgroup_parent=cgroup_parent,
        runtime="runc",
        command=("/no/such/binary",),
        disk_bytes=8 * MiB,
    )
    # Fails at task create, after the layer was made: the rollback removes it.
    with pytest.raises(RuntimeFailure, match="no such file"):
        await runtime.create(spec)
    layers = tmp_path / "runtime" / "disks"
    assert not layers.exists() or list(layers.iterdir()) == []
    assert not loop_devices_of(layers)
    assert "disk-bad-runtime" not in Path("/proc/self/mountinfo").read_text()
