"""The janitor's view of containerd beyond the `Runtime` seam: task log paths, every container
id of the namespace, and its snapshots.

Kept here rather than in `ContainerdRuntime` because only the janitor needs it: the agent's
runtime stays the small seam it is. It talks to the same namespace through the same typed API.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from fastsandbox.agent.runtime._containerd_api import ContainerdApi
from fastsandbox.agent.runtime.containerd_images import is_index, platform_manifest
from fastsandbox.errors import NotFound, RuntimeFailure
from fastsandbox.janitor.images import CachedImage
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
        # Blob sizes by image digest: content is immutable, so measured once.
        self._blobs: dict[str, dict[str, int]] = {}

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

    # -- the image cache (janitor/images.py) ---------------------------------------------------
    async def cached_images(self) -> list[CachedImage]:
        out = []
        for image in await self._api.list_images():
            if image.target.digest not in self._blobs:
                try:
                    self._blobs[image.target.digest] = await self._image_blobs(
                        image.name, image.target
                    )
                except (NotFound, RuntimeFailure):
                    continue  # a pull in progress, or content already collected: next pass
            updated = image.updated_at.seconds + image.updated_at.nanos / 1e9
            out.append(CachedImage(image.name, updated, self._blobs[image.target.digest]))
        return out

    async def _image_blobs(self, ref: str, target: Any) -> dict[str, int]:
        blobs = {target.digest: int(target.size)}
        manifest = await self._read_json(target.digest)
        if is_index(target.media_type, manifest):
            digest = platform_manifest(ref, manifest)
            size = next(
                (int(m.get("size", 0)) for m in manifest["manifests"] if m["digest"] == digest), 0
            )
            blobs[digest] = size
            manifest = await self._read_json(digest)
        for desc in [manifest.get("config") or {}, *(manifest.get("layers") or ())]:
            if desc.get("digest"):
                blobs[str(desc["digest"])] = int(desc.get("size", 0))
        return blobs

    async def _read_json(self, digest: str) -> dict[str, Any]:
        try:
            value = json.loads(await self._api.read_content(digest))
        except ValueError as err:
            raise RuntimeFailure(f"content {digest} is not JSON: {err}") from None
        if not isinstance(value, dict):
            raise RuntimeFailure(f"content {digest} is not a JSON object")
        return value

    async def images_in_use(self) -> set[str]:
        return {c.image for c in await self._api.list_containers() if c.image}

    async def delete_image(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            await self._api.delete_image(name)

    async def close(self) -> None:
        await self._api.close()
