"""Files in a sandbox: `sb.files.read/write/list/stat/mkdir/move/remove`, streamed both ways.

Reads and writes travel as chunks of at most `CHUNK` bytes; `read_stream` and `write` with an
iterable of bytes (or a binary file object) never hold the whole file, so a file of any size
costs a few chunks of memory here. `read` and `write` of `str`/`bytes` are the convenient forms
for small files. A written file appears atomically in the sandbox once it is complete.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import grpc

from fastsandbox.api._proto.fastsandbox.v1 import io_pb2

if TYPE_CHECKING:
    from fastsandbox.sdk.aio import AsyncClient

CHUNK = 256 * 1024

WriteData = (
    str | bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes] | AsyncIterable[bytes]
)


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """One file system entry as the sandbox sees it."""

    name: str
    path: str
    type: str
    """`file`, `dir`, `symlink` or `other`."""
    size: int
    mode: int
    """Permission bits, e.g. 0o644."""
    uid: int
    gid: int
    mtime: float
    """Unix seconds."""
    symlink_target: str = ""

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


def entry_info(entry: io_pb2.FileEntry) -> EntryInfo:
    return EntryInfo(
        name=entry.name,
        path=entry.path,
        type=entry.type,
        size=entry.size,
        mode=entry.mode,
        uid=entry.uid,
        gid=entry.gid,
        mtime=entry.mtime,
        symlink_target=entry.symlink_target,
    )


async def _chunks(data: WriteData) -> AsyncIterator[bytes]:
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            yield bytes(view[i : i + CHUNK])
        return
    if hasattr(data, "read"):
        reader: Any = data
        while chunk := reader.read(CHUNK):
            yield bytes(chunk)
        return
    if isinstance(data, AsyncIterable):
        async for piece in data:
            for i in range(0, len(piece), CHUNK):
                yield bytes(piece[i : i + CHUNK])
        return
    for piece in data:
        for i in range(0, len(piece), CHUNK):
            yield bytes(piece[i : i + CHUNK])


class AsyncFiles:
    """`sb.files`: the sandbox's file system."""

    def __init__(self, client: AsyncClient, namespace: str, name: str) -> None:
        self._client = client
        self._target = io_pb2.SandboxTarget(namespace=namespace, name=name)

    async def _op(self, **fields: Any) -> io_pb2.FileOpResponse:
        stub, metadata = self._client._rpc()
        request = io_pb2.FileOpRequest(target=self._target, **fields)
        try:
            reply: io_pb2.FileOpResponse = await stub.FileOp(request, metadata=metadata)
        except grpc.RpcError as err:
            raise self._client._translate(err) from None
        return reply

    async def read_stream(self, path: str, *, offset: int = 0) -> AsyncIterator[bytes]:
        """The file's bytes, chunk by chunk, from `offset`."""
        async for chunk in self.read_chunks(path, offset=offset):
            if chunk.data:
                yield chunk.data

    async def read_chunks(self, path: str, *, offset: int = 0) -> AsyncIterator[io_pb2.FileChunk]:
        """The raw chunks: the first carries the file's entry (size, mode, mtime)."""
        stub, metadata = self._client._rpc()
        request = io_pb2.ReadFileRequest(target=self._target, path=path, offset=offset)
        call = stub.ReadFile(request, metadata=metadata)
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as err:
            raise self._client._translate(err) from None
        finally:
            call.cancel()

    async def read(self, path: str) -> bytes:
        """The whole file (for small files; use `read_stream` for big ones)."""
        return b"".join([piece async for piece in self.read_stream(path)])

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def write(
        self,
        path: str,
        data: WriteData,
        *,
        mode: int | None = None,
        mtime: float | None = None,
        parents: bool = True,
        user: str | None = None,
    ) -> EntryInfo:
        """Write `data` (text, bytes, a binary file, or an iterable of bytes) to `path`.

        Parent directories are made (`parents`); the mode defaults to the existing file's, else
        0o644. The file appears only once complete.
        """
        header = io_pb2.WriteFileHeader(
            target=self._target, path=path, parents=parents, user=user or ""
        )
        if mode is not None:
            header.mode = mode
        if mtime is not None:
            header.mtime = mtime

        async def inputs() -> AsyncIterator[io_pb2.WriteFileInput]:
            yield io_pb2.WriteFileInput(header=header)
            async for chunk in _chunks(data):
                yield io_pb2.WriteFileInput(data=chunk)

        stub, metadata = self._client._rpc()
        try:
            reply: io_pb2.WriteFileResponse = await stub.WriteFile(inputs(), metadata=metadata)
        except grpc.RpcError as err:
            raise self._client._translate(err) from None
        return entry_info(reply.entry)

    async def stat(self, path: str) -> EntryInfo:
        reply = await self._op(op="stat", path=path)
        return entry_info(reply.entries[0])

    async def exists(self, path: str) -> bool:
        from fastsandbox.errors import NotFound

        try:
            await self.stat(path)
        except NotFound:
            return False
        return True

    async def list(self, path: str, *, depth: int = 1) -> list[EntryInfo]:
        """The directory's entries; `depth` > 1 descends into subdirectories."""
        reply = await self._op(op="list", path=path, depth=depth)
        return [entry_info(e) for e in reply.entries]

    async def mkdir(self, path: str, *, parents: bool = True, mode: int | None = None) -> bool:
        """Make a directory (and its parents); False when it already was one."""
        fields: dict[str, Any] = {"op": "mkdir", "path": path, "recursive": parents}
        if mode is not None:
            fields["mode"] = mode
        return (await self._op(**fields)).created

    async def move(self, source: str, destination: str) -> None:
        await self._op(op="move", path=source, destination=destination)

    rename = move

    async def remove(self, path: str, *, recursive: bool = True) -> None:
        """Remove a file, or a directory with everything in it."""
        await self._op(op="remove", path=path, recursive=recursive)

    async def set_attributes(
        self, path: str, *, mode: int | None = None, mtime: float | None = None
    ) -> None:
        fields: dict[str, Any] = {"op": "setattr", "path": path}
        if mode is not None:
            fields["mode"] = mode
        if mtime is not None:
            fields["mtime"] = mtime
        await self._op(**fields)

    async def watch(
        self, path: str, *, recursive: bool = False
    ) -> AsyncIterator[io_pb2.WatchEvent]:
        """Changes under `path` as they happen (create, write, remove, rename, chmod)."""
        stub, metadata = self._client._rpc()
        call = stub.Watch(
            io_pb2.WatchRequest(target=self._target, path=path, recursive=recursive),
            metadata=metadata,
        )
        try:
            async for event in call:
                yield event
        except grpc.RpcError as err:
            raise self._client._translate(err) from None
        finally:
            call.cancel()
