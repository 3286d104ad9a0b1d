"""A FUSE mount that passes every call through to a backing directory and can be turned
read-only while files are open for writing — what a disk that goes read-only does to a
running server (the read-only scenario, tests/fault/test_readonly.py).

Why FUSE: the kernel refuses `mount -o remount,ro` (ext4, tmpfs, a bind mount alike) while any
file on it is open for writing, and the server always holds SQLite open; an ext4 forced
read-only by an error (`errors=remount-ro`) stays read-only until it is unmounted and checked,
which no running process survives. Here, while the flag file exists, every call that would
change something fails with EROFS exactly as on a read-only mount — writes through fds opened
before included — and works again once the flag is gone.

Run as its own process: `python -m tests.fault._rofs BACKING MOUNTPOINT FLAG` (foreground,
multithreaded; it unmounts on SIGTERM).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import mfusepy as fuse

Attrs = dict[str, Any]


class ReadOnlySwitch(fuse.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, backing: str, flag: str) -> None:
        self.backing = os.path.realpath(backing)
        self.flag = flag

    # -- helpers ---------------------------------------------------------------------------
    def _path(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _writable(self) -> None:
        if os.path.exists(self.flag):
            raise fuse.FuseOSError(errno.EROFS)

    # -- reads -----------------------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> Attrs:
        st = os.fstat(fh) if fh is not None else os.lstat(self._path(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino", "st_blocks")
        out: Attrs = {k: getattr(st, k) for k in keys}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns,
                   st_ctime=st.st_ctime_ns, st_rdev=st.st_rdev)  # fmt: skip
        return out

    def readdir(self, path: str, fh: int) -> list[tuple[str, Attrs, int]]:
        # With each entry's inode (use_ino): an entry of inode 0 is skipped by readdir(3).
        out = []
        with os.scandir(self._path(path)) as entries:
            for e in entries:
                st = e.stat(follow_symlinks=False)
                out.append((e.name, {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0))
        here = os.lstat(self._path(path))
        dot = {"st_mode": here.st_mode, "st_ino": here.st_ino}
        return [(".", dot, 0), ("..", dot, 0), *out]

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK and os.path.exists(self.flag):
            raise fuse.FuseOSError(errno.EROFS)
        if not os.access(self._path(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def statfs(self, path: str) -> Attrs:
        st = os.statvfs(self._path(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
                "f_flag", "f_frsize", "f_namemax")  # fmt: skip
        return {k: getattr(st, k) for k in keys}

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self._writable()
        return os.open(self._path(path), flags & ~os.O_CREAT)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        try:
            return os.getxattr(self._path(path), name, follow_symlinks=False)
        except OSError as exc:
            raise fuse.FuseOSError(exc.errno or errno.ENODATA) from None

    def listxattr(self, path: str) -> list[str]:
        return os.listxattr(self._path(path), follow_symlinks=False)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._writable()
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    # -- changes: EROFS while the flag is there ---------------------------------------------
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._writable()
        # O_RDWR whatever the caller asked: the kernel enforces its access mode, and a file
        # created O_RDWR (SQLite) is read through this same handle.
        return os.open(self._path(path), os.O_RDWR | os.O_CREAT, mode)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._writable()
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._writable()
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._path(path), length)
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        self._writable()
        if mode:
            raise fuse.FuseOSError(errno.EOPNOTSUPP)
        os.posix_fallocate(fh, offset, size)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self._writable()
        os.mkdir(self._path(path), mode)
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._writable()
        os.mknod(self._path(path), mode, dev)
        return 0

    def unlink(self, path: str) -> int:
        self._writable()
        os.unlink(self._path(path))
        return 0

    def rmdir(self, path: str) -> int:
        self._writable()
        os.rmdir(self._path(path))
        return 0

    def rename(self, old: str, new: str) -> int:
        self._writable()
        os.rename(self._path(old), self._path(new))
        return 0

    def link(self, target: str, source: str) -> int:
        self._writable()
        os.link(self._path(source), self._path(target))
        return 0

    def symlink(self, target: str, source: str) -> int:
        self._writable()
        os.symlink(source, self._path(target))
        return 0

    def chmod(self, path: str, mode: int) -> int:
        self._writable()
        os.chmod(self._path(path), mode, follow_symlinks=False)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._writable()
        os.chown(self._path(path), uid, gid, follow_symlinks=False)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._writable()
        os.utime(self._path(path), ns=times, follow_symlinks=False)
        return 0

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self._writable()
        os.setxattr(self._path(path), name, value, options, follow_symlinks=False)
        return 0

    def removexattr(self, path: str, name: str) -> int:
        self._writable()
        os.removexattr(self._path(path), name, follow_symlinks=False)
        return 0


def main(argv: list[str]) -> None:
    backing, mountpoint, flag = argv
    fuse.FUSE(
        ReadOnlySwitch(backing, flag), mountpoint, foreground=True, allow_other=True,
        use_ino=True, fsname="fsb-rofs",
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
