"""Image garbage collection by an LRU disk budget.

Pulled images stay cached (a warm create reads nothing from the registry), so without a bound
the node's disk fills with every image anyone ever named. Each janitor pass measures the cache
and, while it is over `budget_bytes`, deletes the least recently used image that is neither in
use (any container of the namespace, running or stopped, references it) nor pinned (a pool's
`prewarmImages`, which the pool wants present).

What is counted: the image's blobs in the content store (manifests, config, compressed layers),
each blob once however many images share it; deleting an image frees only the blobs no image
left still uses. containerd's own garbage collection (a synchronous delete) then removes the
unpacked snapshots nothing references; those are not counted (typically 2-3x the compressed
size), so set the budget with that in mind (docs/operations.md).

"Recently used" is the later of the image's pull (its record's update time) and the last pass
that saw a container using it. The passes remember that in memory: after a restart an image's
use is its pull time until a container is seen using it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from fastsandbox.api.images import normalize_image_ref
from fastsandbox.errors import FsbError, InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CachedImage:
    name: str
    pulled_at: float
    """Wall-clock seconds of the image record's last update (its pull)."""
    blobs: Mapping[str, int]
    """Digest → size in bytes of every blob the image needs."""


class ImageCache(Protocol):
    """The node's image cache (containerd: `janitor/containerd.py`)."""

    async def cached_images(self) -> list[CachedImage]: ...

    async def images_in_use(self) -> set[str]:
        """Names of the images some container of the namespace references."""
        ...

    async def delete_image(self, name: str) -> None: ...


def cache_bytes(images: Collection[CachedImage]) -> int:
    blobs: dict[str, int] = {}
    for image in images:
        blobs.update(image.blobs)
    return sum(blobs.values())


def choose_evictions(
    images: Collection[CachedImage],
    *,
    budget_bytes: int,
    keep: Collection[str],
    last_used: Mapping[str, float],
) -> list[str]:
    """The images to delete, least recently used first, until the cache fits the budget;
    never one in `keep`. May stop over budget when only kept images are left."""
    left = {i.name: i for i in images}
    evict: list[str] = []
    candidates = sorted(
        (i for i in images if i.name not in keep),
        key=lambda i: (max(i.pulled_at, last_used.get(i.name, 0.0)), i.name),
    )
    for image in candidates:
        if cache_bytes(left.values()) <= budget_bytes:
            break
        evict.append(image.name)
        del left[image.name]
    return evict


class ImageCollector:
    """One pass per `collect()`: delete LRU images until the cache fits `budget_bytes`."""

    def __init__(
        self,
        cache: ImageCache,
        *,
        budget_bytes: int,
        pinned: Callable[[], Awaitable[Collection[str]]],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if budget_bytes <= 0:
            raise InvalidArgument(
                f"image cache budget {budget_bytes}: must be positive (a size such as 20Gi)"
            )
        self.cache = cache
        self.budget_bytes = budget_bytes
        self.pinned = pinned
        self._wall = wall_clock
        self._last_used: dict[str, float] = {}

    async def collect(self) -> list[str]:
        images = await self.cache.cached_images()
        in_use = await self.cache.images_in_use()
        now = self._wall()
        for name in in_use:
            self._last_used[name] = now
        pinned = {_normal(p) for p in await self.pinned()}
        keep = in_use | pinned
        evict = choose_evictions(
            images, budget_bytes=self.budget_bytes, keep=keep, last_used=self._last_used
        )
        removed: list[str] = []
        for name in evict:
            try:
                await self.cache.delete_image(name)
            except FsbError as exc:
                log.warning("could not delete image", extra={"image": name, "err": exc.message})
                continue
            self._last_used.pop(name, None)
            removed.append(name)
            log.info("deleted least recently used image", extra={"image": name})
        if evict and len(removed) == len(evict):
            left = [i for i in images if i.name not in removed]
            log.info(
                "image cache within budget" if cache_bytes(left) <= self.budget_bytes
                else "image cache over budget: the rest is in use or pinned",
                extra={"bytes": cache_bytes(left), "budget": self.budget_bytes},
            )  # fmt: skip
        return removed


def _normal(name: str) -> str:
    try:
        return normalize_image_ref(name)
    except InvalidArgument:
        return name
