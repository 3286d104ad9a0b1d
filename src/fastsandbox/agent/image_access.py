"""Who may use a cached image: a private image already on this node only for a caller whose pull
credentials its registry accepts.

Without this, a tenant's private image, once pulled with its credentials, could be run by anyone
who names it: the node's cache answers before any registry is asked. So before a cached image is
reused the agent knows whether it is public (an anonymous pull or manifest HEAD succeeds) and,
when it is not, asks the registry with the caller's credentials (one manifest HEAD per create;
`runtime/registry_probe.py`). An image pulled anonymously here is public for this agent's life;
anything else (pulled with credentials, by an earlier agent life, by another agent sharing the
namespace) is probed anonymously once and remembered.
"""

from __future__ import annotations

import logging
from typing import Protocol

from fastsandbox.api.images import PullCredentials
from fastsandbox.errors import PermissionDenied

log = logging.getLogger(__name__)


class RegistryAccess(Protocol):
    async def registry_allows(self, image: str, credentials: PullCredentials | None) -> bool: ...


class ImageAccess:
    def __init__(self, registry: RegistryAccess) -> None:
        self.registry = registry
        # Image reference -> whether anyone may pull it; absent: not known yet.
        self._public: dict[str, bool] = {}

    def pulled(self, image: str, credentials: PullCredentials | None) -> None:
        """`image` was just pulled: anonymously means public; with credentials, not known (a
        public image pulled with needless credentials must not become private)."""
        if credentials is None:
            self._public[image] = True
        else:
            self._public.pop(image, None)

    async def check_cached(self, image: str, credentials: PullCredentials | None) -> None:
        """PermissionDenied unless the caller may use the cached `image`."""
        public = self._public.get(image)
        if public is None:
            public = await self.registry.registry_allows(image, None)
            self._public[image] = public
        if public:
            return
        if credentials is None:
            raise PermissionDenied(
                f"image {image} is private (its registry refuses anonymous pulls): give pull "
                "credentials the registry accepts (pull_credentials)"
            )
        if not await self.registry.registry_allows(image, credentials):
            log.info("pull credentials refused for a cached image", extra={"image": image})
            raise PermissionDenied(
                f"the registry refused the pull credentials for image {image} "
                f"(user {credentials.username})"
            )
