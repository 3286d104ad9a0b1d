"""The janitor's view of containerd beyond the `Runtime` seam: task log paths, every container
id of the namespace, and its snapshots.

Kept here rather than in `ContainerdRuntime` because only the janitor needs it: the agent's
runtime stays the small seam it is. It talks to the same namespace through the same typed API.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from fastsandbox.agent.runtime._containerd_api import ContainerdApi
from fastsandbox.errors import NotFound
from fastsandbox.janitor.janitor import SnapshotSeen

# containerd's snapshot kinds (snapshots.v1.Kind): UNKNOWN, VIEW, ACTIVE, COMMITTED.
_KIND_ACTIVE = 2


def log_path_of(uri: str) -> str | None:
    """The file a task's stdout URI names: a `file://` path, or the `path` argument of a
    `binary://` logger (fsb-logger's); None for FIFOs and other schemes."""
    if uri.startswith("file://"):
        return unquote(urlparse(uri).path) or None
    if uri.startswith("binary://"):
        paths = parse_qs(urlparse(uri).query).get("path")
        return paths[0] if paths else None
    return None


class ContainerdLeftovers:
    """`Leftovers` over containerd's gRPC API for one namespace and snapshotter."""

    def __init__(
        self, socket: str | Path, namespace: str = "fastsandbox", snapshotter: str = "overlayfs"
    ) -> None:
        self.snapshotter = snapshotter
        self._api = ContainerdApi(socket, namespace)

    async def log_paths(self) -> dict[str, str]:
        paths = {}
        for task in await self._api.list_tasks():
            path = log_path_of(task.stdout)
            if path:
                # containerd fills `id` (not `container_id`) for init processes in List.
                paths[task.container_id or task.id] = path
        return paths

    async def container_ids(self) -> set[str]:
        return {c.id for c in await self._api.list_containers()}

    async def snapshots(self) -> list[SnapshotSeen]:
        return [
            SnapshotSeen(
                key=info.name,
                active=info.kind == _KIND_ACTIVE,
                created_at=info.created_at.seconds + info.created_at.nanos / 1e9,
            )
            for info in await self._api.list_snapshots(self.snapshotter)
        ]

    async def remove_snapshot(self, key: str) -> None:
        with contextlib.suppress(NotFound):
            await self._api.remove_snapshot(self.snapshotter, key)

    async def close(self) -> None:
        await self._api.close()
