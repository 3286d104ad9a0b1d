"""containerd-specific behaviour beyond the runtime contract (tests/contract)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fastsandbox.agent.runtime.base import ContainerSpec, ContainerStatus
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.errors import InvalidArgument, Unavailable
from tests.infra import ContainerdProc, cannot_run

pytestmark = pytest.mark.integration


@pytest.fixture
async def runtime(
    containerd: ContainerdProc, demo_image: str, tmp_path: Path
) -> AsyncIterator[ContainerdRuntime]:
    rt = ContainerdRuntime(
        containerd.socket, "fastsandbox", [demo_image.split("/", 1)[0]], state_dir=tmp_path
    )
    try:
        yield rt
    finally:
        await rt.close()


async def test_pull_repairs_an_image_whose_layers_are_gone(
    containerd: ContainerdProc, demo_image: str, tmp_path: Path, cgroup_parent: str,
) -> None:  # fmt: skip
    # A namespace of its own: a container of another test sharing the image's snapshot chain
    # would make the layer removal below fail ("cannot remove snapshot with child").
    namespace = "fsb-repair-test"
    runtime = ContainerdRuntime(
        containerd.socket, namespace, [demo_image.split("/", 1)[0]], state_dir=tmp_path
    )
    try:
        await _pull_repair(runtime, containerd, namespace, demo_image, tmp_path, cgroup_parent)
    finally:
        await runtime.close()


async def _pull_repair(
    runtime: ContainerdRuntime, containerd: ContainerdProc, namespace: str, demo_image: str,
    tmp_path: Path, cgroup_parent: str,
) -> None:  # fmt: skip
    await runtime.pull(demo_image)
    chain = (await runtime.image_config(demo_image)).chain_id
    containerd.ctr("snapshots", "rm", chain, namespace=namespace)
    await runtime.pull(demo_image)
    spec = ContainerSpec(
        id="repaired",
        image=demo_image,
        log_path=str(tmp_path / "repaired.log"),
        command=("true",),
        cgroup_parent=cgroup_parent,
    )
    try:
        state = await runtime.create(spec)
        assert state.status in (ContainerStatus.RUNNING, ContainerStatus.STOPPED)
    finally:
        await runtime.delete(spec.id, 0)


async def test_concurrent_pulls_agree(runtime: ContainerdRuntime, demo_image: str) -> None:
    infos = await asyncio.gather(*(runtime.pull(demo_image) for _ in range(4)))
    assert len(set(infos)) == 1


async def test_unknown_runtime_is_invalid(
    runtime: ContainerdRuntime, demo_image: str, tmp_path: Path
) -> None:
    await runtime.pull(demo_image)
    spec = ContainerSpec(
        id="bad-runtime", image=demo_image, log_path=str(tmp_path / "x.log"), runtime="kata"
    )
    with pytest.raises(InvalidArgument, match="kata"):
        await runtime.create(spec)


async def test_a_silent_socket_is_unavailable(tmp_path: Path) -> None:
    rt = ContainerdRuntime(tmp_path / "nobody-listens.sock")
    try:
        with pytest.raises(Unavailable):
            await rt.images()
    finally:
        await rt.close()


async def test_an_id_containerd_refuses_is_invalid(
    runtime: ContainerdRuntime, demo_image: str, tmp_path: Path
) -> None:
    await runtime.pull(demo_image)
    spec = ContainerSpec(id="bad/id", image=demo_image, log_path=str(tmp_path / "x.log"))
    with pytest.raises(InvalidArgument):
        await runtime.create(spec)


async def test_fsb_init_is_pid1_and_forwards_sigterm(
    runtime: ContainerdRuntime,
    containerd: ContainerdProc,
    demo_image: str,
    cgroup_parent: str,
    tmp_path: Path,
) -> None:
    """With fsb-init, `sleep` (which has no SIGTERM handler) dies of a SIGTERM sent to PID 1;
    without it, PID 1 ignores SIGTERM and every delete waits the whole grace period."""
    from fastsandbox.agent.init_binary import find_init

    init = find_init()
    if init is None:
        cannot_run("fsb-supervisor is not built (scripts/build-native)")
    await runtime.pull(demo_image)
    log = tmp_path / "init.log"
    spec = ContainerSpec(
        id="init-pid1",
        image=demo_image,
        log_path=str(log),
        command=("sh", "-c", "echo pid=$$ ppid=$PPID; exec sleep 3600"),
        cgroup_parent=cgroup_parent,
        init_path=str(init),
    )
    try:
        await runtime.create(spec)
        for _ in range(100):
            if "pid=" in log.read_text():
                break
            await asyncio.sleep(0.05)
        # The user's command is not PID 1 but a child of it (fsb-init).
        pid, ppid = log.read_text().split()
        assert ppid == "ppid=1" and pid != "pid=1"
        containerd.ctr("tasks", "kill", "-s", "SIGTERM", "init-pid1")
        for _ in range(100):
            state = await runtime.get("init-pid1")
            if state.status is ContainerStatus.STOPPED:
                break
            await asyncio.sleep(0.05)
        assert state.status is ContainerStatus.STOPPED
        assert state.exit_code == 143  # 128 + SIGTERM: the child died of the forwarded signal
    finally:
        await runtime.delete("init-pid1", 0)
