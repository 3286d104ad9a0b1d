"""A gVisor sandbox whose spec names a network namespace runs in it: the runsc wrapper
(agent/runtime/runsc_wrapper.py) starts runsc's `create` inside that namespace, so the Sentry's
`--network=host` sees only its interfaces. The namespace is one this test makes (a dummy link
pair with names no host has), and is removed by name afterwards."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fastsandbox.agent.runtime.base import ContainerSpec, ContainerStatus
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.errors import RuntimeFailure
from tests.infra import ContainerdProc, cannot_run, missing_requirements

pytestmark = pytest.mark.integration

PROBE_LINK, PROBE_PEER = "fsbprobe0", "fsbprobe1"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[str]:
    if (why := missing_requirements(gvisor=True)) is not None:
        cannot_run(why)
    name = f"fsbhard-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        # A veth pair with both ends inside (this kernel has no dummy links).
        _ip("-n", name, "link", "add", PROBE_LINK, "type", "veth", "peer", "name", PROBE_PEER)
        _ip("-n", name, "link", "set", "lo", "up")
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


@pytest.fixture
async def runtime(containerd: ContainerdProc, tmp_path: Path) -> AsyncIterator[ContainerdRuntime]:
    rt = ContainerdRuntime(containerd.socket, "fastsandbox", ["127.0.0.1"], state_dir=tmp_path)
    try:
        yield rt
    finally:
        await rt.close()


def _interfaces(proc_net_dev: str) -> set[str]:
    # Two header lines, then "  name: counters...".
    return {line.split(":")[0].strip() for line in proc_net_dev.splitlines()[2:] if ":" in line}


async def _run(runtime: ContainerdRuntime, spec: ContainerSpec) -> str:
    try:
        await runtime.create(spec)
        for _ in range(1200):
            if (await runtime.get(spec.id)).status is ContainerStatus.STOPPED:
                break
            await asyncio.sleep(0.05)
        assert (await runtime.get(spec.id)).exit_code == 0, Path(spec.log_path).read_text()
        return Path(spec.log_path).read_text()
    finally:
        await runtime.delete(spec.id, 0)


async def test_gvisor_sandbox_sees_only_its_namespace(
    runtime: ContainerdRuntime, demo_image: str, cgroup_parent: str, tmp_path: Path, netns: str
) -> None:
    await runtime.pull(demo_image)
    host = _interfaces(Path("/proc/net/dev").read_text())
    assert PROBE_LINK not in host

    def spec(name: str, netns_path: str | None) -> ContainerSpec:
        return ContainerSpec(
            id=f"{name}-{os.getpid()}", image=demo_image, runtime="gvisor",
            cgroup_parent=cgroup_parent, log_path=str(tmp_path / f"{name}.log"),
            netns_path=netns_path, command=("cat", "/proc/net/dev"),
        )  # fmt: skip

    inside = await _run(runtime, spec("gv-netns", netns))
    print(inside)
    assert _interfaces(inside) == {"lo", PROBE_LINK, PROBE_PEER}, inside
    # The same sandbox without a namespace path is in the agent's (here: the host's): the
    # check above is not vacuous.
    outside = await _run(runtime, spec("gv-hostns", None))
    assert PROBE_LINK not in _interfaces(outside) and _interfaces(outside) - {"lo"}, outside


async def test_gvisor_create_fails_when_its_namespace_is_gone(
    runtime: ContainerdRuntime, demo_image: str, cgroup_parent: str, tmp_path: Path
) -> None:
    if (why := missing_requirements(gvisor=True)) is not None:
        cannot_run(why)
    await runtime.pull(demo_image)
    spec = ContainerSpec(
        id=f"gv-nons-{os.getpid()}", image=demo_image, runtime="gvisor",
        cgroup_parent=cgroup_parent,
        log_path=str(tmp_path / "x.log"), netns_path="/var/run/netns/fsbhard-missing",
        command=("true",),
    )  # fmt: skip
    with pytest.raises(RuntimeFailure, match="fsbhard-missing"):
        await runtime.create(spec)
    assert [c.id for c in await runtime.list() if c.id == spec.id] == []
