"""A sandbox's confinement, checked from inside a real runc container: the allowlist seccomp
profile (a static probe, probes/seccomp_probe.c compiled here, calls what hostile code would and
what ordinary programs do, and prints the errno of each call), ordinary busybox programs running
unaffected, and every masked and read-only path of the spec (oci_spec.MASKED_PATHS,
READONLY_PATHS)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fastsandbox.agent.runtime.base import ContainerSpec, ContainerStatus
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.agent.runtime.oci_spec import MASKED_PATHS, READONLY_PATHS
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


async def test_masked_and_read_only_paths_from_inside(
    runtime: ContainerdRuntime, demo_image: str, cgroup_parent: str, tmp_path: Path
) -> None:
    # A masked file reads as empty (/dev/null over it), a masked directory lists as empty
    # (a read-only tmpfs over it); nothing under a read-only path or /sys can be written.
    checks = []
    for path in MASKED_PATHS:
        checks.append(
            f"if [ -d {path} ]; then n=$(ls -A {path} | wc -l); else n=$(head -c 64 {path} "
            f"2>/dev/null | wc -c); fi; echo masked {path} $n"
        )
    for path in (*READONLY_PATHS, "/proc/sys/kernel/hostname", "/sys/kernel"):
        target = f"{path}/fsb-probe" if path in ("/proc/sys", "/proc/bus") else path
        checks.append(
            f"if {{ echo x > {target}; }} 2>/dev/null; then w=1; else w=0; fi; echo wrote {path} $w"
        )
    checks.append("if mknod /tmp/sda b 8 0 2>/dev/null; then echo mknod 1; else echo mknod 0; fi")
    out = await _run_to_exit(
        runtime, demo_image, ("sh", "-c", "; ".join(checks)), cgroup_parent,
        tmp_path / "paths.log", "paths-probe",
    )  # fmt: skip
    print(out)
    lines = out.splitlines()
    seen_masked = {line.split()[1] for line in lines if line.startswith("masked ")}
    assert seen_masked == set(MASKED_PATHS), out
    for line in lines:
        assert line.split()[-1] == "0", f"not confined: {line}"
    assert sum(line.startswith("wrote ") for line in lines) == len(READONLY_PATHS) + 2
