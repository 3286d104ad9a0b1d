"""A small async client for the containerd services we call, over `grpc.aio` on a unix socket.

Why hand-written: our `.proto` subset (proto/fastsandbox/v1/containerd_subset.proto) declares
only messages, with containerd's field numbers; the methods are called here by their full
containerd path (`/containerd.services.tasks.v1.Tasks/Create`), so no generated stub carries the
wrong package name. Every call sends the `containerd-namespace` metadata.

This module is the one seam where gRPC errors from containerd become our error tree, through
the one code table (`errors.from_grpc`: NOT_FOUND → `NotFound`, UNAVAILABLE → `Unavailable`, ...);
a code the table does not know becomes `RuntimeFailure`. Each carries containerd's own message
and what we were doing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import grpc
from google.protobuf import any_pb2

from fastsandbox.api._proto.fastsandbox.v1 import containerd_subset_pb2 as pb
from fastsandbox.errors import FsbError, RuntimeFailure, from_grpc

NAMESPACE_HEADER = "containerd-namespace"
# Ordinary calls are quick metadata operations; a stuck containerd must not hang an agent.
DEFAULT_TIMEOUT = 30.0
_MAX_MESSAGE = 64 * 1024 * 1024

_CONTAINERS = "/containerd.services.containers.v1.Containers/"
_IMAGES = "/containerd.services.images.v1.Images/"
_CONTENT = "/containerd.services.content.v1.Content/"
_SNAPSHOTS = "/containerd.services.snapshots.v1.Snapshots/"
_TASKS = "/containerd.services.tasks.v1.Tasks/"
RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


class _Message(Protocol):
    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


R = TypeVar("R")


def translate(err: grpc.aio.AioRpcError, what: str) -> FsbError:
    """containerd's gRPC error → our error tree, with containerd's words kept."""
    code = err.code()
    message = f"containerd: {what}: {err.details() or code.name}"
    return from_grpc(code, message, fallback=RuntimeFailure)


def _serialize(message: Any) -> bytes:
    return cast(_Message, message).SerializeToString()


class ContainerdApi:
    """Typed calls to one containerd namespace. The channel is opened lazily in the running
    event loop (a grpc.aio channel belongs to the loop it was first used in)."""

    def __init__(self, socket: str | Path, namespace: str) -> None:
        self.socket = str(socket)
        self.namespace = namespace
        self._metadata = ((NAMESPACE_HEADER, namespace),)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _chan(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            self._channel = grpc.aio.insecure_channel(
                f"unix://{self.socket}",
                options=[("grpc.max_receive_message_length", _MAX_MESSAGE)],
            )
            self._loop = loop
        return self._channel

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and self._loop is asyncio.get_running_loop():
            await channel.close(None)

    def _unary_callable(self, method: str, response_type: type[R]) -> Any:
        return self._chan().unary_unary(
            method,
            request_serializer=_serialize,
            response_deserializer=response_type.FromString,  # type: ignore[attr-defined]
        )

    async def _unary(
        self,
        method: str,
        request: Any,
        response_type: type[R],
        what: str,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> R:
        call = self._unary_callable(method, response_type)
        try:
            return cast(R, await call(request, timeout=timeout, metadata=self._metadata))
        except grpc.aio.AioRpcError as err:
            raise translate(err, what) from None

    async def _stream(
        self, method: str, request: Any, response_type: type[R], what: str
    ) -> list[R]:
        call = self._chan().unary_stream(
            method,
            request_serializer=_serialize,
            response_deserializer=response_type.FromString,  # type: ignore[attr-defined]
        )
        try:
            return [
                cast(R, r)
                async for r in call(request, timeout=DEFAULT_TIMEOUT, metadata=self._metadata)
            ]
        except grpc.aio.AioRpcError as err:
            raise translate(err, what) from None

    # -- containers ---------------------------------------------------------------------------

    async def get_container(self, container_id: str) -> pb.CtdContainer:
        resp = await self._unary(
            _CONTAINERS + "Get",
            pb.CtdGetContainerRequest(id=container_id),
            pb.CtdGetContainerResponse,
            f"get container {container_id}",
        )
        return resp.container

    async def list_containers(self, filters: Iterable[str] = ()) -> list[pb.CtdContainer]:
        resp = await self._unary(
            _CONTAINERS + "List",
            pb.CtdListContainersRequest(filters=list(filters)),
            pb.CtdListContainersResponse,
            "list containers",
        )
        return list(resp.containers)

    async def create_container(self, container: pb.CtdContainer) -> pb.CtdContainer:
        resp = await self._unary(
            _CONTAINERS + "Create",
            pb.CtdCreateContainerRequest(container=container),
            pb.CtdCreateContainerResponse,
            f"create container {container.id}",
        )
        return resp.container

    async def update_container(self, container: pb.CtdContainer, paths: Iterable[str]) -> None:
        """Replace the record's fields named in `paths` (e.g. "labels", "spec"). Only the
        record changes: a running task keeps the spec it was started with."""
        await self._unary(
            _CONTAINERS + "Update",
            pb.CtdUpdateContainerRequest(
                container=container, update_mask=pb.CtdFieldMask(paths=list(paths))
            ),
            pb.CtdUpdateContainerResponse,
            f"update container {container.id}",
        )

    async def delete_container(self, container_id: str) -> None:
        await self._unary(
            _CONTAINERS + "Delete",
            pb.CtdDeleteContainerRequest(id=container_id),
            pb.CtdEmpty,
            f"delete container {container_id}",
        )

    # -- images and content -------------------------------------------------------------------

    async def get_image(self, name: str) -> pb.CtdImage:
        resp = await self._unary(
            _IMAGES + "Get", pb.CtdGetImageRequest(name=name), pb.CtdGetImageResponse,
            f"get image {name}",
        )  # fmt: skip
        return resp.image

    async def list_images(self, filters: Iterable[str] = ()) -> list[pb.CtdImage]:
        resp = await self._unary(
            _IMAGES + "List",
            pb.CtdListImagesRequest(filters=list(filters)),
            pb.CtdListImagesResponse,
            "list images",
        )
        return list(resp.images)

    async def delete_image(self, name: str) -> None:
        """Remove the image record and (sync) let containerd collect what nothing else uses:
        layers a container's snapshot still stands on stay."""
        await self._unary(
            _IMAGES + "Delete", pb.CtdDeleteImageRequest(name=name, sync=True), pb.CtdEmpty,
            f"delete image {name}",
        )  # fmt: skip

    async def read_content(self, digest: str) -> bytes:
        chunks = await self._stream(
            _CONTENT + "Read",
            pb.CtdReadContentRequest(digest=digest),
            pb.CtdReadContentResponse,
            f"read content {digest}",
        )
        return b"".join(c.data for c in sorted(chunks, key=lambda c: c.offset))

    # -- snapshots ----------------------------------------------------------------------------

    async def prepare_snapshot(
        self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str] | None = None
    ) -> list[pb.CtdMount]:
        resp = await self._unary(
            _SNAPSHOTS + "Prepare",
            pb.CtdPrepareSnapshotRequest(
                snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels or {})
            ),
            pb.CtdPrepareSnapshotResponse,
            f"prepare snapshot {key}",
        )
        return list(resp.mounts)

    async def snapshot_mounts(self, snapshotter: str, key: str) -> list[pb.CtdMount]:
        resp = await self._unary(
            _SNAPSHOTS + "Mounts",
            pb.CtdMountsRequest(snapshotter=snapshotter, key=key),
            pb.CtdMountsResponse,
            f"mounts of snapshot {key}",
        )
        return list(resp.mounts)

    async def remove_snapshot(self, snapshotter: str, key: str) -> None:
        await self._unary(
            _SNAPSHOTS + "Remove",
            pb.CtdRemoveSnapshotRequest(snapshotter=snapshotter, key=key),
            pb.CtdEmpty,
            f"remove snapshot {key}",
        )

    async def stat_snapshot(self, snapshotter: str, key: str) -> pb.CtdSnapshotInfo:
        resp = await self._unary(
            _SNAPSHOTS + "Stat",
            pb.CtdStatSnapshotRequest(snapshotter=snapshotter, key=key),
            pb.CtdStatSnapshotResponse,
            f"stat snapshot {key}",
        )
        return resp.info

    async def list_snapshots(
        self, snapshotter: str, filters: Iterable[str] = ()
    ) -> list[pb.CtdSnapshotInfo]:
        pages = await self._stream(
            _SNAPSHOTS + "List",
            pb.CtdListSnapshotsRequest(snapshotter=snapshotter, filters=list(filters)),
            pb.CtdListSnapshotsResponse,
            "list snapshots",
        )
        return [info for page in pages for info in page.info]

    # -- tasks --------------------------------------------------------------------------------

    async def create_task(self, request: pb.CtdCreateTaskRequest) -> pb.CtdCreateTaskResponse:
        return await self._unary(
            _TASKS + "Create", request, pb.CtdCreateTaskResponse,
            f"create task {request.container_id}",
        )  # fmt: skip

    async def start_task(self, container_id: str, exec_id: str = "") -> int:
        resp = await self._unary(
            _TASKS + "Start",
            pb.CtdStartRequest(container_id=container_id, exec_id=exec_id),
            pb.CtdStartResponse,
            f"start task {container_id}",
        )
        return resp.pid

    async def update_task(self, container_id: str, resources: Mapping[str, Any]) -> None:
        """A running task's cgroup limits (the runc shim runs `runc update`)."""
        await self._unary(
            _TASKS + "Update",
            pb.CtdUpdateTaskRequest(
                container_id=container_id,
                resources=any_pb2.Any(
                    type_url=RESOURCES_TYPE_URL, value=json.dumps(dict(resources)).encode()
                ),
            ),
            pb.CtdEmpty,
            f"update task {container_id}",
        )

    async def kill(
        self, container_id: str, signal: int, *, all_processes: bool = False, exec_id: str = ""
    ) -> None:
        await self._unary(
            _TASKS + "Kill",
            pb.CtdKillRequest(
                container_id=container_id, exec_id=exec_id, signal=signal, all=all_processes
            ),
            pb.CtdEmpty,
            f"kill task {container_id} with signal {signal}",
        )

    async def get_task(self, container_id: str, exec_id: str = "") -> pb.CtdProcess:
        resp = await self._unary(
            _TASKS + "Get",
            pb.CtdGetTaskRequest(container_id=container_id, exec_id=exec_id),
            pb.CtdGetTaskResponse,
            f"get task {container_id}",
        )
        return resp.process

    async def list_tasks(self) -> list[pb.CtdProcess]:
        resp = await self._unary(
            _TASKS + "List", pb.CtdListTasksRequest(), pb.CtdListTasksResponse, "list tasks"
        )
        return list(resp.tasks)

    async def wait(
        self, container_id: str, timeout: float | None, exec_id: str = ""
    ) -> pb.CtdWaitResponse | None:
        """Wait for the process to exit; None when `timeout` passed first.

        The timeout is ours (the call is cancelled), not a gRPC deadline: containerd passes a
        deadline on to the shim and answers UNKNOWN "context deadline exceeded"."""
        call = self._unary_callable(_TASKS + "Wait", pb.CtdWaitResponse)
        request = pb.CtdWaitRequest(container_id=container_id, exec_id=exec_id)
        try:
            async with asyncio.timeout(timeout):
                return cast(pb.CtdWaitResponse, await call(request, metadata=self._metadata))
        except TimeoutError:
            return None
        except grpc.aio.AioRpcError as err:
            raise translate(err, f"wait for task {container_id}") from None

    async def delete_task(self, container_id: str) -> pb.CtdDeleteResponse:
        return await self._unary(
            _TASKS + "Delete",
            pb.CtdDeleteTaskRequest(container_id=container_id),
            pb.CtdDeleteResponse,
            f"delete task {container_id}",
        )

    async def exec_process(self, request: pb.CtdExecProcessRequest) -> None:
        await self._unary(
            _TASKS + "Exec", request, pb.CtdEmpty,
            f"exec {request.exec_id} in {request.container_id}",
        )  # fmt: skip

    async def delete_process(self, container_id: str, exec_id: str) -> pb.CtdDeleteResponse:
        return await self._unary(
            _TASKS + "DeleteProcess",
            pb.CtdDeleteProcessRequest(container_id=container_id, exec_id=exec_id),
            pb.CtdDeleteResponse,
            f"delete process {exec_id} in {container_id}",
        )

    async def close_io(self, container_id: str, exec_id: str = "", *, stdin: bool = True) -> None:
        await self._unary(
            _TASKS + "CloseIO",
            pb.CtdCloseIORequest(container_id=container_id, exec_id=exec_id, stdin=stdin),
            pb.CtdEmpty,
            f"close io of {container_id}",
        )
