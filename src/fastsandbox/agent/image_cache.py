"""The images present on this agent: which are cached, one pull per image at a time, and who may
use a cached one (`image_access.py`).

Why a set in memory: a create asks "is it here?" on its hot path, and a runtime call per create
would cost a containerd round trip. A miss costs only a pull that finds everything present, and
an image pruned behind our back is forgotten when a create finds it missing (`forget`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from fastsandbox._aio.keyed import KeyedLocks
from fastsandbox.agent.image_access import ImageAccess
from fastsandbox.agent.runtime.base import ImageInfo, Runtime
from fastsandbox.api.images import PullCredentials
from fastsandbox.metrics import Metrics

log = logging.getLogger(__name__)


class ImageCache:
    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.access = ImageAccess(runtime)
        self._names: set[str] = set()
        self._locks = KeyedLocks()

    def __contains__(self, image: str) -> bool:
        return image in self._names

    def learn(self, names: Iterable[str]) -> None:
        """Images the runtime showed as present."""
        self._names.update(names)

    def forget(self, image: str) -> None:
        """`image` turned out to be missing (pruned by someone): the next use pulls it."""
        self._names.discard(image)

    async def check_cached(self, image: str, credentials: PullCredentials | None) -> None:
        """PermissionDenied unless the caller may use the cached `image`."""
        await self.access.check_cached(image, credentials)

    # One pull per image at a time: concurrent creates of a cold image wait for the same pull
    # instead of each starting their own.
    async def ensure(
        self, image: str, credentials: PullCredentials | None = None, *, checked: bool = False
    ) -> None:
        """Pull `image` unless cached; a cached one is checked for this caller unless
        `checked` (the create checked it when it began)."""
        async with self._locks.hold(image):
            if image not in self._names:
                await self._pull_locked(image, credentials)
            elif not checked:
                # Pulled meanwhile by a concurrent create, perhaps with credentials not ours.
                await self.access.check_cached(image, credentials)

    async def pull(self, image: str, credentials: PullCredentials | None = None) -> ImageInfo:
        async with self._locks.hold(image):
            return await self._pull_locked(image, credentials)

    async def _pull_locked(self, image: str, credentials: PullCredentials | None) -> ImageInfo:
        started = time.perf_counter()
        info = await self.runtime.pull(image, credentials)
        self.access.pulled(image, credentials)
        self.metrics.pull_seconds.observe(time.perf_counter() - started)
        self._names.update((image, info.name))
        log.info("image ready", extra={"image": image, "digest": info.digest})
        return info
