"""`fsb cp SRC NAME:DST` and `fsb cp NAME:SRC DST`, like `docker cp`, directories included.

Files are streamed in chunks both ways (a file of any size costs a few chunks of memory), with
their permission bits and mtime kept; a directory is copied with everything under it. As in
docker: copying onto an existing directory puts SRC inside it, otherwise DST becomes the copy.
A downloaded file is written next to its destination and renamed into place when complete.
Every wrong path is one line naming it (not found, is a directory, permission denied).
A local path with a colon is written `./a:b`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fastsandbox.cli.options import Endpoint, Namespace, TokenFile

if TYPE_CHECKING:
    from fastsandbox.sdk.files import AsyncFiles, EntryInfo

_REMOTE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?):(.*)$")
# Deep enough for any real tree; the server caps a listing's depth at 64 as well.
_LIST_DEPTH = 64


def split_remote(spec: str) -> tuple[str, str] | None:
    """`NAME:PATH` → (name, path); None for a local path."""
    if spec.startswith(("/", ".")):
        return None
    match = _REMOTE.match(spec)
    if match is None:
        return None
    return match.group(1), match.group(3) or "/"


def _local_error(exc: OSError, path: Path | str) -> Exception:
    from fastsandbox.errors import FsbError, NotFound

    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{path}: no such file or directory")
    if isinstance(exc, PermissionError):
        return FsbError(f"{path}: permission denied")
    if isinstance(exc, IsADirectoryError):
        return FsbError(f"{path}: is a directory")
    if isinstance(exc, NotADirectoryError):
        return FsbError(f"{path}: not a directory")
    return FsbError(f"{path}: {exc.strerror or exc}")


async def _remote_stat(files: AsyncFiles, path: str) -> EntryInfo | None:
    from fastsandbox.errors import NotFound

    try:
        return await files.stat(path)
    except NotFound:
        return None


async def upload(files: AsyncFiles, local: Path, remote: str) -> int:
    """Copy a local file or tree to `remote`; returns the bytes sent."""
    try:
        st = local.lstat()
    except OSError as exc:
        raise _local_error(exc, local) from None
    existing = await _remote_stat(files, remote)
    if (existing is not None and existing.is_dir) or (existing is None and remote.endswith("/")):
        remote = posixpath.join(remote, local.resolve().name)
    if not stat.S_ISDIR(st.st_mode):
        return await _upload_file(files, local, remote, st)
    sent = 0
    dirs: list[tuple[str, os.stat_result]] = []
    try:
        for dirpath, dirnames, filenames in os.walk(local, onerror=_raise):
            dirnames.sort()
            base = Path(dirpath)
            rel = base.relative_to(local)
            target = posixpath.join(remote, *rel.parts) if rel.parts else remote
            dst = base.stat()
            await files.mkdir(target, parents=True)
            dirs.append((target, dst))
            for fname in sorted(filenames):
                path = base / fname
                fst = path.lstat()
                if stat.S_ISREG(fst.st_mode):
                    sent += await _upload_file(files, path, posixpath.join(target, fname), fst)
    except OSError as exc:
        raise _local_error(exc, exc.filename or local) from None
    # Directory mtimes last: writing into them above changed them.
    for target, dst in reversed(dirs):
        await files.set_attributes(target, mode=stat.S_IMODE(dst.st_mode), mtime=dst.st_mtime)
    return sent


def _raise(exc: OSError) -> None:
    raise exc


async def _upload_file(files: AsyncFiles, local: Path, remote: str, st: os.stat_result) -> int:
    try:
        f = local.open("rb")
    except OSError as exc:
        raise _local_error(exc, local) from None
    with f:
        await files.write(remote, f, mode=stat.S_IMODE(st.st_mode), mtime=st.st_mtime)
    return st.st_size


async def download(files: AsyncFiles, remote: str, local: Path) -> int:
    """Copy a file or tree at `remote` to `local`; returns the bytes received."""
    entry = await files.stat(remote)
    if local.is_dir():
        local = local / (posixpath.basename(remote.rstrip("/")) or "root")
    elif str(local).endswith("/"):
        raise _local_error(FileNotFoundError(), local)
    if not entry.is_dir:
        return await _download_file(files, entry, local)
    received = 0
    entries = await files.list(remote, depth=_LIST_DEPTH)
    dirs: list[tuple[Path, EntryInfo]] = [(local, entry)]
    try:
        local.mkdir(exist_ok=True)
        root = remote.rstrip("/") or "/"
        for item in entries:
            rel = posixpath.relpath(item.path, root)
            target = local / rel
            if item.is_dir:
                target.mkdir(exist_ok=True)
                dirs.append((target, item))
            elif item.type == "file":
                received += await _download_file(files, item, target)
            elif item.type == "symlink":
                with contextlib.suppress(FileExistsError):
                    target.symlink_to(item.symlink_target)
    except OSError as exc:
        raise _local_error(exc, exc.filename or local) from None
    for path, item in sorted(dirs, key=lambda d: len(d[0].parts), reverse=True):
        os.chmod(path, item.mode)
        os.utime(path, (item.mtime, item.mtime))
    return received


async def _download_file(files: AsyncFiles, entry: EntryInfo, local: Path) -> int:
    part = local.with_name(f".{local.name}.fsb-part")
    received = 0
    try:
        with part.open("wb") as f:
            async for data in files.read_stream(entry.path):
                f.write(data)
                received += len(data)
        os.chmod(part, entry.mode)
        os.utime(part, (entry.mtime, entry.mtime))
        os.replace(part, local)
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink()
        raise _local_error(
            exc, local if exc.filename in (None, str(part)) else exc.filename
        ) from None
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    return received


async def run_cp(
    src: str, dst: str, *, endpoint: str | None, token_file: str | None, namespace: str | None
) -> int:
    from fastsandbox.errors import InvalidArgument
    from fastsandbox.sdk.aio import AsyncClient
    from fastsandbox.sdk.files import AsyncFiles

    source, dest = split_remote(src), split_remote(dst)
    if (source is None) == (dest is None):
        raise InvalidArgument("cp: exactly one of SRC and DST must be NAME:PATH")
    async with AsyncClient(endpoint, None, namespace, token_file=token_file) as client:
        if dest is not None:
            name, path = dest
            return await upload(AsyncFiles(client, client.namespace, name), Path(src), path)
        assert source is not None
        name, path = source
        return await download(AsyncFiles(client, client.namespace, name), path, Path(dst))


def cp(
    src: Annotated[str, typer.Argument(help="Local path or NAME:PATH.", show_default=False)],
    dst: Annotated[str, typer.Argument(help="NAME:PATH or local path.", show_default=False)],
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Copy files or directories between here and a sandbox."""
    asyncio.run(run_cp(src, dst, endpoint=endpoint, token_file=token_file, namespace=namespace))
