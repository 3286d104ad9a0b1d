"""What a user namespace costs a runc sandbox's create, measured here (runc 1.1.5, containerd
1.6.20, kernel 6.18), against the plain create in the same run.

Run as root after `scripts/setup`:  .venv/bin/python benchmarks/userns_create.py [-n 30]

It starts a private containerd and a loopback registry (tests/infra.py) with the busybox demo
image and, optionally (`--big`), an image with one extra layer of N files (`--files`, default
5000 x 4 KiB: a small language runtime), then creates and deletes sandboxes sequentially,
interleaving three modes so load on this shared machine hits all of them alike:

  plain        today's create: ContainerdRuntime.create() called → returned (container record,
               snapshot prepared, task created and started; `sleep` as PID 1)
  userns-copy  the same, in a user namespace (container uid 0 = host uid 100000, 65536 ids):
               what containerd 1.6 offers (the Go client's WithRemappedSnapshot): the prepared
               snapshot is mounted and every file chowned to the mapped ids. On overlayfs that
               chown copies each file up into the sandbox's own layer: a copy of the image per
               sandbox (time and disk grow with the image).
  userns-idmap the same user namespace, no copy: each image layer is bind-mounted *idmapped*
               (mount_setattr MOUNT_ATTR_IDMAP, kernel ≥ 5.12 for ext4/xfs; overlayfs itself
               refuses to be idmapped here, EINVAL, but accepts idmapped lower layers, kernel
               ≥ 5.19; an idmapped upper fails, EOVERFLOW), the sandbox's own empty upper is
               chowned to the mapped root, the overlay is mounted from those, and runc
               gets it as an absolute `root.path`. runc ≥ 1.2 does this itself (idmapped mounts
               in the spec); runc 1.1.5 does not, so the agent would have to. Measured here,
               not shipped (docs/security.md).

Each sample: create called → returned, milliseconds; the delete (and unmounts) is outside the
timed span. It also checks once per userns mode that the sandbox's PID 1 runs as host uid
100000 (so root inside is not root outside). Printed as p50/p95/p99/max (benchmarks/peers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peers import row  # noqa: E402
from fastsandbox.agent.runtime import containerd as containerd_module  # noqa: E402
from fastsandbox.agent.runtime.base import ContainerSpec  # noqa: E402
from fastsandbox.agent.runtime.containerd import ContainerdRuntime  # noqa: E402
from fastsandbox.api._proto.fastsandbox.v1 import containerd_subset_pb2 as pb  # noqa: E402
from tests.infra import (  # noqa: E402
    build_demo_image,
    push_image,
    remove_cgroup,
    start_containerd,
    start_registry,
)

HOST_BASE, SIZE = 100_000, 65_536
CGROUP = f"/fsb-bench-userns-{os.getpid()}"

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC, _AT_EMPTY_PATH = 1, 0o2000000, 0x1000
_MOUNT_ATTR_IDMAP, _MOVE_MOUNT_F_EMPTY_PATH, _MNT_DETACH = 0x00100000, 0x4, 2


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def userns_fd() -> int:
    """An fd of a user namespace mapping 0..SIZE to HOST_BASE.. (kept open: the namespace
    lives as long as the fd; one per mapping, made once, as an agent would)."""
    holder = subprocess.Popen(["unshare", "--user", "sleep", "600"])
    try:
        for _ in range(400):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{holder.pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                    break
            time.sleep(0.005)
        for kind in ("uid_map", "gid_map"):
            Path(f"/proc/{holder.pid}/{kind}").write_text(f"0 {HOST_BASE} {SIZE}\n")
        return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        holder.kill()
        holder.wait()


def idmapped_bind(source: str, target: Path, ns_fd: int) -> None:
    target.mkdir(parents=True, exist_ok=True)
    fd = _check(_libc.syscall(_SYS_OPEN_TREE, -100, source.encode(),
                              _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC), "open_tree")  # fmt: skip
    try:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, ns_fd)
        _check(_libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
                             ctypes.sizeof(attr)), f"mount_setattr {source}")  # fmt: skip
        _check(_libc.syscall(_SYS_MOVE_MOUNT, fd, b"", -100, str(target).encode(),
                             _MOVE_MOUNT_F_EMPTY_PATH), "move_mount")  # fmt: skip
    finally:
        os.close(fd)


def mount(source: str, target: Path, fstype: str, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    _check(_libc.mount(source.encode(), str(target).encode(), fstype.encode(), 0,
                       options.encode()), f"mount {fstype} {target}")  # fmt: skip


def umount(target: Path) -> None:
    _libc.umount2(str(target).encode(), _MNT_DETACH)


def overlay_options(mounts: list[pb.CtdMount]) -> dict[str, str]:
    (m,) = mounts
    if m.type != "overlay":
        raise RuntimeError(f"expected an overlay snapshot, got {m.type}")
    return dict(o.partition("=")[::2] for o in m.options)


def chown_tree(root: Path) -> None:
    """Shift every owner by HOST_BASE (what containerd 1.6's remapped snapshot does)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            os.lchown(path, HOST_BASE + st.st_uid, HOST_BASE + st.st_gid)


class Bench(ContainerdRuntime):
    """ContainerdRuntime with a mode: how the snapshot becomes the rootfs, and the spec."""

    mode = "plain"
    ns_fd = -1
    work: Path

    async def _prepare_snapshot(self, key: str, parent: str) -> list[pb.CtdMount]:
        mounts = await super()._prepare_snapshot(key, parent)
        if self.mode == "userns-copy":
            opts = overlay_options(mounts)
            target = self.work / key / "copy"
            mount("overlay", target, "overlay", ",".join(f"{k}={v}" for k, v in opts.items()))
            try:
                await asyncio.to_thread(chown_tree, target)
            finally:
                umount(target)
            return mounts
        if self.mode == "userns-idmap":
            opts = overlay_options(mounts)
            base = self.work / key
            lowers = []
            for i, lower in enumerate(opts["lowerdir"].split(":")):
                idmapped_bind(lower, base / f"l{i}", self.ns_fd)
                lowers.append(str(base / f"l{i}"))
            # The upper layer is not idmapped: overlayfs creates its work dirs as the mounter
            # (host root), which an idmapped mount cannot represent (EOVERFLOW, and the overlay
            # falls back to read-only). It is the sandbox's own, fresh and empty: giving its
            # root to the mapped root is one chown, not a copy.
            os.chown(opts["upperdir"], HOST_BASE, HOST_BASE)
            mount("overlay", base / "rootfs", "overlay",
                  f"lowerdir={':'.join(lowers)},upperdir={opts['upperdir']},"
                  f"workdir={opts['workdir']},index=off")  # fmt: skip
            return []
        return mounts

    def cleanup(self, key: str) -> None:
        base = self.work / key
        if not base.exists():
            return
        for target in [base / "rootfs", *sorted(base.glob("l*")), base / "copy"]:
            umount(target)
        shutil.rmtree(base, ignore_errors=True)


def spec_hook(bench: Bench) -> Callable[..., dict[str, Any]]:
    real = containerd_module.build_oci_spec

    def build(**kw: Any) -> dict[str, Any]:
        spec = real(**kw)
        if bench.mode == "plain":
            return spec
        linux = spec["linux"]
        linux["namespaces"].append({"type": "user"})
        mapping = [{"containerID": 0, "hostID": HOST_BASE, "size": SIZE}]
        linux["uidMappings"], linux["gidMappings"] = mapping, list(mapping)
        # sysfs cannot be mounted in a user namespace that does not own the network namespace
        # (the host's, here): bind the host's read-only instead, as runc does by hand.
        for m in spec["mounts"]:
            if m["destination"] == "/sys":
                m.update(type="bind", source="/sys", options=["rbind", "nosuid", "noexec",
                                                              "nodev", "ro"])  # fmt: skip
        if bench.mode == "userns-idmap":
            spec["root"]["path"] = str(bench.work / kw["container_id"] / "rootfs")
        return spec

    return build


def _host_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise RuntimeError("no Uid line")


def _big_image(workdir: Path, registry_addr: str, files: int) -> str:
    layout = workdir / "big-layout"
    shutil.copytree(build_demo_image(workdir / "demo"), layout)
    bundle = workdir / "big-bundle"
    umoci = ["umoci", "--log", "error"]
    subprocess.run([*umoci, "unpack", "--rootless", "--image", f"{layout}:latest", str(bundle)],
                   check=True)  # fmt: skip
    lib = bundle / "rootfs" / "usr" / "lib" / "bench"
    for i in range(files):
        d = lib / f"d{i // 100}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.py").write_bytes(os.urandom(4096))
    subprocess.run([*umoci, "repack", "--image", f"{layout}:latest", str(bundle)], check=True)
    return push_image(layout, registry_addr, "userns-big:latest")


async def run(n: int, big: bool, files: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fsb-bench-userns-"))
    # The mapped root (host uid 100000) must traverse to its bundle's rootfs (mkdtemp is 0700).
    tmp.chmod(0o755)
    ns_fd = userns_fd()
    ctd = start_containerd(tmp / "ctd")
    try:
        reg = start_registry(tmp / "reg")
    except BaseException:
        ctd.stop()
        raise
    rt = Bench(ctd.socket, "fastsandbox", ["127.0.0.1"], state_dir=tmp / "state")
    rt.work = tmp / "work"
    rt.ns_fd = ns_fd
    containerd_module.build_oci_spec = spec_hook(rt)  # type: ignore[assignment]
    try:
        images = {"busybox": push_image(build_demo_image(tmp / "img"), reg.addr)}
        if big:
            images[f"busybox+{files} files"] = _big_image(tmp, reg.addr, files)
        for label, image in images.items():
            await rt.pull(image)
            samples: dict[str, list[float]] = {m: [] for m in ("plain", "userns-copy",
                                                                "userns-idmap")}  # fmt: skip
            for i in range(n + 1):  # the first round warms caches and is not counted
                for mode, values in samples.items():
                    rt.mode = mode
                    cid = f"u{i}-{mode}"
                    spec = ContainerSpec(
                        id=cid, image=image, log_path=str(tmp / f"{cid}.log"),
                        command=("sleep", "3600"), cgroup_parent=CGROUP,
                    )  # fmt: skip
                    t0 = time.perf_counter()
                    state = await rt.create(spec)
                    took = (time.perf_counter() - t0) * 1000
                    try:
                        if i == 0 and mode != "plain":
                            uid = _host_uid(state.pid)
                            assert uid == HOST_BASE, f"{mode}: PID 1 runs as host uid {uid}"
                        if i:
                            values.append(took)
                    finally:
                        await rt.delete(cid, 0)
                        rt.cleanup(cid)
            print(f"\n{label}: create called → returned (task started), ms; PID 1 host uid "
                  f"{HOST_BASE} checked for both userns modes")  # fmt: skip
            for mode, values in samples.items():
                print(row(mode, values))
    finally:
        for left in sorted(rt.work.glob("*")) if rt.work.exists() else ():
            rt.cleanup(left.name)  # mounts of a create that failed part-way
        await rt.close()
        os.close(rt.ns_fd)
        with contextlib.suppress(Exception):
            ctd.stop()
        with contextlib.suppress(Exception):
            reg.stop()
        remove_cgroup(CGROUP)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=30)
    parser.add_argument("--big", action="store_true", help="also an image with many files")
    parser.add_argument("--files", type=int, default=5000)
    args = parser.parse_args()
    asyncio.run(run(args.n, args.big, args.files))


if __name__ == "__main__":
    main()
