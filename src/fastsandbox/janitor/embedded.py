"""`KnownState` for the embedded server: records from the store, agents and slots from plain
callables the composition root builds over the control plane's registry (so the janitor never
imports `control`).

In flight: a create takes its registry slot before the agent starts the container and keeps it
until the record is written (or the create failed and the slot was released). So the slots held
are the containers that are recorded or in flight, except the orphans recovery adopted at start
(live containers without a record keep their slot rather than be double-booked). `prime()`
remembers those once, after recovery and before the Fast-Path accepts writes; they are the ones
the janitor may remove, and `removed()` releases their slot afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from fastsandbox.api.models import Sandbox, SandboxPool
from fastsandbox.store.base import ObjectStore

log = logging.getLogger(__name__)


class EmbeddedKnownState:
    def __init__(
        self,
        store: ObjectStore,
        *,
        agents: Callable[[], Iterable[str]],
        held: Callable[[], Iterable[str]],
        release: Callable[[str], None],
    ) -> None:
        """`agents`: names of the live agents; `held`: sandbox ids holding a registry slot;
        `release`: give back the slot a sandbox id holds (no-op when it holds none)."""
        self.store = store
        self._agents = agents
        self._held = held
        self._release = release
        self._adopted_orphans: set[str] = set()

    async def live_agents(self) -> set[str]:
        return set(self._agents())

    async def recorded_container_ids(self) -> set[str]:
        return {
            sb.status.container_id
            for sb in await self.store.list(Sandbox)
            if sb.status.container_id
        }

    async def prime(self) -> None:
        """Call once after recovery, before writes are accepted: remember the slots recovery
        gave to containers without a record."""
        recorded = await self.recorded_container_ids()
        self._adopted_orphans = set(self._held()) - recorded
        if self._adopted_orphans:
            log.info(
                "janitor watches containers adopted without a record",
                extra={"count": len(self._adopted_orphans)},
            )

    def in_flight(self) -> set[str]:
        return set(self._held()) - self._adopted_orphans

    def removed(self, container_id: str) -> None:
        """The `on_removed` hook: the janitor removed this container; free its slot."""
        self._adopted_orphans.discard(container_id)
        self._release(container_id)


async def pinned_images(store: ObjectStore) -> set[str]:
    """Images the image collector never deletes: every pool's `prewarmImages`."""
    return {image for pool in await store.list(SandboxPool) for image in pool.spec.prewarm_images}
