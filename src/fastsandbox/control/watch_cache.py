"""What a create reads before placement, kept from the store's watch (Kubernetes replicas).

Embedded, "is the name free" and "does the pool exist" are two SQLite reads (≈ 0.3 ms); through a
controller replica they were two apiserver round trips (≈ 5 ms, docs/performance.md). The replica
already lists and watches every Sandbox to keep its slot view (`ReplicaSync.records_loop`); this
keeps the names from that same watch, and the pools from one of their own, so a create asks the
apiserver nothing before placement.

The cache lags behind other replicas' writes by a watch event, so it only ever answers "free" or
"exists" when it has listed since its last failure (otherwise None: ask the store). A name taken
by another replica within that lag is caught by the record write, which refuses the duplicate
(`SandboxService._persist` removes the container it started for it).
"""

from __future__ import annotations

import asyncio
import logging

from fastsandbox.api.models import SandboxPool
from fastsandbox.errors import Conflict, FsbError
from fastsandbox.store.base import EventType, ObjectStore

log = logging.getLogger(__name__)

Key = tuple[str, str]


class WatchCache:
    def __init__(self) -> None:
        self._names: set[Key] = set()
        self._pools: dict[Key, SandboxPool] = {}
        self._names_synced = False
        self._pools_synced = False

    # -- ReadCache ---------------------------------------------------------------------------
    def name_taken(self, namespace: str, name: str) -> bool | None:
        if not self._names_synced:
            return None
        return (namespace, name) in self._names

    def pool(self, namespace: str, name: str) -> SandboxPool | None:
        if not self._pools_synced:
            return None
        return self._pools.get((namespace, name))

    # -- fed by the watches ------------------------------------------------------------------
    def names_listed(self, keys: set[Key]) -> None:
        self._names = set(keys)
        self._names_synced = True

    def name_seen(self, key: Key, *, deleted: bool) -> None:
        if deleted:
            self._names.discard(key)
        else:
            self._names.add(key)

    def names_lost(self) -> None:
        self._names_synced = False

    async def pools_loop(self, store: ObjectStore, interval: float) -> None:
        while True:
            try:
                since = await store.current_resource_version()
                pools = await store.list(SandboxPool)
                self._pools = {(p.metadata.namespace, p.metadata.name): p for p in pools}
                self._pools_synced = True
                async for event in store.watch(SandboxPool, since):
                    obj = event.object
                    if event.type is EventType.BOOKMARK or not isinstance(obj, SandboxPool):
                        continue
                    key = (obj.metadata.namespace, obj.metadata.name)
                    if event.type is EventType.DELETED:
                        self._pools.pop(key, None)
                    else:
                        self._pools[key] = obj
            except Conflict:
                log.info("pool watch history expired; listing again")
            except FsbError as exc:
                log.warning("pool watch failed; listing again", extra={"err": str(exc)})
                self._pools_synced = False
                await asyncio.sleep(interval)
            except BaseException:
                self._pools_synced = False
                raise
