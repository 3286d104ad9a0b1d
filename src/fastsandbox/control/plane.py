"""The control plane as one object: registry, agent clients, sandbox and pool services, their
background loops and the Fast-Path servicer, over any `ObjectStore` and `AgentFleet`.

`start()` runs crash recovery before anything else, so by the time a caller serves the Fast-Path
the registry already holds every slot in use. The composition root (`server.py`) and the unit
tests build the plane the same way, with different backends.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastsandbox._aio.tasks import TaskSet, guarded
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.fastpath.service import FastPathService
from fastsandbox.control.lifecycle import SandboxLifecycle
from fastsandbox.control.pools import PoolManager
from fastsandbox.control.recovery import RecoveryReport, recover
from fastsandbox.control.registry import AgentRecord, Registry
from fastsandbox.control.sandbox_reconciler import SandboxReconciler
from fastsandbox.control.sandboxes import SandboxService
from fastsandbox.fleet.base import AgentFleet
from fastsandbox.store.base import ObjectStore


@dataclass(frozen=True, slots=True)
class PlaneSettings:
    delete_grace_seconds: float = 10.0
    heartbeat_seconds: float = 1.0
    default_cpu: str = "1"
    default_memory: str = "512Mi"
    pool_resync_seconds: float = 2.0
    expired_retention_seconds: float = 24 * 3600.0


class ControlPlane:
    def __init__(self, store: ObjectStore, fleet: AgentFleet, settings: PlaneSettings) -> None:
        self.store = store
        self.fleet = fleet
        self.registry = Registry()
        self.clients = AgentClients()
        self.sandboxes = SandboxService(
            store,
            self.registry,
            self.clients,
            grace_seconds=settings.delete_grace_seconds,
            default_cpu=settings.default_cpu,
            default_memory=settings.default_memory,
        )
        self.pools = PoolManager(
            store,
            self.registry,
            fleet,
            self.clients,
            heartbeat_seconds=settings.heartbeat_seconds,
        )
        self.lifecycle = SandboxLifecycle(
            self.sandboxes, expired_retention_seconds=settings.expired_retention_seconds
        )
        self.reconciler = SandboxReconciler(self.lifecycle)
        self.registry.listeners.append(self._wake_sandboxes)
        self.servicer = FastPathService(self.sandboxes, self.pools, store)
        self._settings = settings
        self._tasks = TaskSet()

    def _wake_sandboxes(self, agent: AgentRecord, sandbox_ids: set[str]) -> None:
        """An agent came or went, or reported exits: look at those sandboxes now."""
        for sandbox_id in sandbox_ids:
            key = self.sandboxes.keys.get(sandbox_id)
            if key is not None:
                self.reconciler.enqueue(key)

    async def start(self) -> RecoveryReport:
        report = await recover(self.pools, self.sandboxes)
        await self.pools.reconcile_all()
        self._tasks.spawn(guarded("heartbeats", self.pools.heartbeat_loop), name="heartbeats")
        self._tasks.spawn(
            guarded("pools", lambda: self.pools.reconcile_loop(self._settings.pool_resync_seconds)),
            name="pools",
        )
        self._tasks.spawn(guarded("sandboxes", self.reconciler.run), name="sandboxes")
        return report

    async def close(self) -> None:
        """Stop the loops and the fleet's supervision; sandboxes keep running."""
        await self._tasks.close()
        await self.fleet.close()
        await self.clients.close()
