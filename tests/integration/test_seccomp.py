"""The allowlist seccomp profile, checked from inside a real runc container: a static probe
(probes/seccomp_probe.c, compiled here) calls what hostile code would and what ordinary programs
do, and prints the errno of each call. Ordinary busybox programs run in the same image."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fastsandbox.agent.runtime.base import ContainerSpec, ContainerStatus
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from tests.infra import ContainerdProc, RegistryProc, build_demo_image, push_image

pytestmark = pytest.mark.integration

PROBE_SOURCE = Path(__file__).parent / "probes" / "seccomp_probe.c"
EPERM, ENOSYS = 1, 38


def _build_probe_image(workdir: Path, registry: RegistryProc) -> str:
    """The demo image plus /probe (static), pushed as probe:latest."""
    binary = workdir / "probe"
    subprocess.run(
        ["cc", "-static", "-O1", "-o", str(binary), str(PROBE_SOURCE)], check=True, timeout=120
    )
    layout = workdir / "layout"
    shutil.copytree(build_demo_image(workdir), layout)
    bundle = workdir / "bundle"
    umoci = ["umoci", "--log", "error"]
    subprocess.run([*umoci, "unpack", "--rootless", "--image", f"{layout}:latest", str(bundle)],
                   check=True, timeout=120)  # fmt: skip
    shutil.copy2(binary, bundle / "rootfs" / "probe")
    subprocess.run([*umoci, "repack", "--image", f"{layout}:latest", str(bundle)],
                   check=True, timeout=120)  # fmt: skip
    return push_image(layout, registry.addr, "seccomp-probe:latest")


@pytest.fixture
async def runtime(containerd: ContainerdProc, tmp_path: Path) -> AsyncIterator[ContainerdRuntime]:
    rt = ContainerdRuntime(containerd.socket, "fastsandbox", ["127.0.0.1"], state_dir=tmp_path)
    try:
        yield rt
    finally:
        await rt.close()


async def _run_to_exit(
    runtime: ContainerdRuntime, image: str, command: tuple[str, ...], cgroup_parent: str,
    log: Path, cid: str,
) -> str:  # fmt: skip
    await runtime.pull(image)
    spec = ContainerSpec(
        id=cid, image=image, log_path=str(log), command=command, cgroup_parent=cgroup_parent
    )
    try:
        await runtime.create(spec)
        for _ in range(600):
            if (await runtime.get(cid)).status is ContainerStatus.STOPPED:
                break
            await asyncio.sleep(0.05)
        return log.read_text()
    finally:
        await runtime.delete(cid, 0)


async def test_hostile_calls_get_eperm_and_ordinary_ones_work(
    runtime: ContainerdRuntime, registry: RegistryProc, cgroup_parent: str, tmp_path: Path
) -> None:
    image = _build_probe_image(tmp_path, registry)
    out = await _run_to_exit(
        runtime, image, ("/probe",), cgroup_parent, tmp_path / "probe.log", "seccomp-probe"
    )
    assert out.rstrip().endswith("done"), out
    got = dict(line.split() for line in out.splitlines() if line != "done")
    print("probe results:", got)
    refused = ["set_mempolicy", "personality_addr_no_randomize", "unshare_newuser",
               "io_uring_setup", "ptrace_traceme", "clone_newns", "socket_vsock",
               "socket_alg"]  # fmt: skip
    for name in refused:
        assert got[name] == str(EPERM), (name, got[name])
    # A syscall newer than the profile never reaches the kernel (unfiltered: EBADF). It gets
    # the default EPERM, or ENOSYS when its number is past the newest syscall the host's
    # libseccomp knows: runc's deliberate stub, so that libc falls back to an older call.
    assert got["syscall_463"] in (str(EPERM), str(ENOSYS)), got["syscall_463"]
    for name in ("personality_query", "socket_inet", "socket_unix", "fork_exec_true"):
        assert got[name] == "0", (name, got[name])


async def test_busybox_programs_run_unaffected(
    runtime: ContainerdRuntime, demo_image: str, cgroup_parent: str, tmp_path: Path
) -> None:
    script = (
        "set -e; mkdir -p /tmp/d && echo hi > /tmp/d/f && cat /tmp/d/f; ls / >/dev/null;"
        " tar -cf /tmp/a.tar /tmp/d && tar -tf /tmp/a.tar >/dev/null; sha256sum /tmp/d/f;"
        " (sleep 0.1 &) ; wait; ps >/dev/null; date >/dev/null; nc -l -p 0 -e true & kill $!;"
        " echo ok"
    )
    out = await _run_to_exit(
        runtime, demo_image, ("sh", "-c", script), cgroup_parent, tmp_path / "bb.log", "bb-ok"
    )
    assert out.splitlines()[0] == "hi" and out.rstrip().endswith("ok"), out
