"""A sandbox's writable layer with a real size limit: its overlay upper dir on a file system of
its own, a sparse ext4 image of exactly the limit, loop-mounted under the runtime's state dir.

Why this mechanism: containerd 1.6's overlayfs snapshotter keeps every upper dir under its root,
here on ext4 without project quotas (and the system containerd is shared, so its root cannot be
moved onto an XFS with `prjquota`). A file system per sandbox needs nothing from the host's
file systems: a write past the limit fails inside the sandbox with ENOSPC, and only there — the
host's disk and other sandboxes are untouched, the sandbox keeps running.

Cost: `truncate` + `mkfs.ext4` (no journal, lazy inode tables: a few hundred KiB are written) +
a loop mount (in-process: `loop_mount.py`, ~1 ms; `mount -o loop` was ~7 ms), ~10 ms per create
here (docs/performance.md, "Cold create"), and a loop device per sandbox. The image is
sparse: the host pays only for what is written. An agent keeps a few images formatted ahead
(`spare_layers.py`), so a cold create usually takes one by rename and skips the mkfs.
Without a journal a host crash may leave the image unclean; the layer is scratch space that
dies with the sandbox, so that is accepted.

The snapshot containerd prepared keeps its own (empty) upper dir; the task's overlay mount is
rewritten to use `upper/` and `work/` on the small file system instead. Remove is a lazy
unmount (the loop device goes with the last user, `autoclear`), then the image file.

Where the agent may not mount (a Kubernetes agent Pod: no CAP_SYS_ADMIN, and its mounts would
live in the Pod's mount namespace where the node's shim cannot see them), the layer is
**mounted by containerd's shim** instead (`bundle_root` set): the agent only writes the image
(`mkfs.ext4 -d` puts `upper/` and `work/` in it, no mount needed) and hands the shim two rootfs
mounts, the image with containerd's `loop` option (the shim attaches a loop device, autoclear)
and then the overlay, whose upper and work dirs are on that file system. The shim mounts both
on the task's bundle rootfs, in that order, so the overlay's `upperdir=<rootfs>/upper` resolves
into the ext4 before the overlay covers it; on task delete (or a failed create, or the shim's
own cleanup after it died) it unmounts the rootfs until nothing is left (`UnmountAll`), and the
loop device goes with the last unmount. The agent then deletes the image file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from fastsandbox.agent.runtime import loop_mount
from fastsandbox.agent.runtime.spare_layers import SPARE_PREFIX, SpareLayers
from fastsandbox.api._proto.fastsandbox.v1 import containerd_subset_pb2 as pb
from fastsandbox.api.quantity import MIN_DISK_BYTES
from fastsandbox.errors import InvalidArgument, RuntimeFailure

log = logging.getLogger(__name__)

_MKFS_OPTIONS = ("-q", "-F", "-m", "0", "-O", "^has_journal")
_MKFS_EXTENDED = "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
_TAIL = 1000
_TEMPLATE = ".tmpl"
# Under containerd's state dir: runtime v2 task bundles, `<namespace>/<container id>/rootfs`.
TASK_BUNDLES = "io.containerd.runtime.v2.task"


async def _run(argv: Sequence[str]) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise RuntimeFailure(
            f"{argv[0]} not found: the disk limit needs e2fsprogs and util-linux (scripts/setup)"
        ) from None
    _, err = await proc.communicate()
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip()[-_TAIL:]
        raise RuntimeFailure(f"{list(argv)!r} exited {proc.returncode}: {tail}")


class WritableLayers:
    """Size-limited upper dirs, one per container id, under `root` (`<id>.img`, `<id>/`)."""

    def __init__(
        self,
        root: Path,
        mkfs: str = "mkfs.ext4",
        bundle_root: Path | None = None,
        *,
        spares: int = 0,
    ) -> None:
        self.root = root
        self.mkfs = mkfs
        # containerd's task bundles (`<state>/io.containerd.runtime.v2.task/<namespace>`):
        # set, the shim mounts each layer (see the module docstring); None, the agent does.
        self.bundle_root = bundle_root
        # Loop device and mount by ioctl + mount(2) (loop_mount.py) until the host says it
        # cannot; then by `mount -o loop`.
        self._in_process = True
        # Images formatted ahead, off the request path (spare_layers.py).
        self.spares = SpareLayers(root, self._format_spare, per_size=spares)

    def image_path(self, container_id: str) -> Path:
        return self.root / f"{container_id}.img"

    def mount_path(self, container_id: str) -> Path:
        return self.root / container_id

    async def make(self, container_id: str, size_bytes: int) -> Path:
        """A mounted file system of `size_bytes` for `container_id`; returns its mount point.
        Idempotent: an existing mount (a retried create) is returned as it is."""
        if size_bytes < MIN_DISK_BYTES:
            raise InvalidArgument(
                f"disk_bytes {size_bytes}: must be at least {MIN_DISK_BYTES} bytes (1Mi)"
            )
        if self.bundle_root is not None:
            await self._make_image(container_id, size_bytes)
            return self.image_path(container_id)
        mnt = self.mount_path(container_id)
        if mnt.is_mount():
            return mnt
        image = self.image_path(container_id)
        self.root.mkdir(parents=True, exist_ok=True)
        mnt.mkdir(exist_ok=True)
        try:
            if not self.spares.take(size_bytes, image):
                await self._format(image, size_bytes, self._template(container_id))
            await self._mount(image, mnt)
            for sub in ("upper", "work"):
                (mnt / sub).mkdir(exist_ok=True)
        except BaseException:
            await asyncio.shield(self.remove(container_id))
            raise
        return mnt

    async def _mount(self, image: Path, mnt: Path) -> None:
        if self._in_process:
            try:
                loop_mount.mount_image(str(image), str(mnt))
                return
            except loop_mount.Unsupported as why:
                log.info("loop-mounting with mount(8) from now on", extra={"why": str(why)})
                self._in_process = False
        await _run(["mount", "-o", "loop", str(image), str(mnt)])

    def _template(self, container_id: str) -> Path:
        return self.root / f".{container_id}{_TEMPLATE}"

    async def _make_image(self, container_id: str, size_bytes: int) -> None:
        """The image only, with empty `upper/` and `work/` in it, for the shim to mount."""
        image = self.image_path(container_id)
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.spares.take(size_bytes, image):
            await self._format(image, size_bytes, self._template(container_id))

    async def _format_spare(self, image: Path, size_bytes: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        await self._format(image, size_bytes, image.with_suffix(_TEMPLATE))

    async def _format(self, image: Path, size_bytes: int, template: Path) -> None:
        """A sparse ext4 image of exactly `size_bytes` at `image`, with empty `upper/` and
        `work/` (from `template`, a scratch directory removed after); nothing left when it
        fails."""
        try:
            for sub in ("upper", "work"):
                (template / sub).mkdir(parents=True, exist_ok=True)
            with image.open("wb") as f:
                f.truncate(size_bytes)
            await _run(
                [self.mkfs, *_MKFS_OPTIONS, "-E", _MKFS_EXTENDED, "-d", str(template), str(image)]
            )
        except BaseException:
            image.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(template, ignore_errors=True)

    def rootfs(
        self, container_id: str, mounts: Sequence[pb.CtdMount], layer: Path
    ) -> list[pb.CtdMount]:
        """The task's rootfs mounts: the snapshot's, with the overlay's upper dir in `layer`
        (what `make` returned)."""
        if self.bundle_root is None:
            return with_upper(mounts, layer)
        # The shim mounts these in order on `<bundle>/rootfs`: the ext4 first, so the
        # overlay's upper dir paths below resolve into it.
        target = self.bundle_root / container_id / "rootfs"
        image = pb.CtdMount(type="ext4", source=str(layer), options=["loop", "rw"])
        return [image, *with_upper(mounts, target)]

    async def remove(self, container_id: str) -> bool:
        """Unmount and delete the layer of `container_id`; False when there was none."""
        mnt, image = self.mount_path(container_id), self.image_path(container_id)
        existed = False
        if mnt.is_mount():
            # Lazy: the task's overlay may still hold it for a moment; the loop device is freed
            # with its last user.
            loop_mount.unmount_lazy(str(mnt))
            existed = True
        for leftover in (mnt, self._template(container_id)):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
                existed = True
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
            existed = True
        return existed

    async def close(self) -> None:
        """Stop making spares and delete them (the layers in use stay with their containers)."""
        await self.spares.close()

    def known(self) -> list[str]:
        """Container ids that have a layer here (for the janitor's orphan sweep)."""
        if not self.root.is_dir():
            return []
        ids = {p.stem for p in self.root.glob("*.img") if not p.name.startswith(SPARE_PREFIX)}
        for p in self.root.iterdir():
            if not p.is_dir() or p.name.startswith(SPARE_PREFIX):
                continue  # a spare's template: the spares' own sweep takes it
            name = p.name
            if name.startswith(".") and name.endswith(_TEMPLATE):
                # An image's template an agent left when it died in `make`.
                name = name[1 : -len(_TEMPLATE)]
            ids.add(name)
        return sorted(ids)


def with_upper(mounts: Sequence[pb.CtdMount], layer: Path) -> list[pb.CtdMount]:
    """`mounts` (the snapshot's) with the overlay's upperdir and workdir moved into `layer`."""
    out: list[pb.CtdMount] = []
    rewritten = False
    for mount in mounts:
        if mount.type != "overlay":
            out.append(mount)
            continue
        options = [o for o in mount.options if not o.startswith(("upperdir=", "workdir="))]
        options += [f"upperdir={layer / 'upper'}", f"workdir={layer / 'work'}"]
        out.append(pb.CtdMount(type=mount.type, source=mount.source, target=mount.target,
                               options=options))  # fmt: skip
        rewritten = True
    if not rewritten:
        # A bind mount (an image with no layers) has no upper dir to limit.
        raise RuntimeFailure(
            "the snapshot has no overlay mount: the disk limit needs the overlayfs snapshotter"
        )
    return out
