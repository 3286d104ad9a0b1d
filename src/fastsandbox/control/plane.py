"""The control plane as one object: registry, agent clients, sandbox and pool services, their
background loops and the Fast-Path servicer, over any `ObjectStore` and `AgentFleet`.

Its work comes in two parts, because the Kubernetes controller runs several replicas:

- `start_serving()` — what every replica needs to serve the Fast-Path: crash recovery (so the
  registry holds every slot in use before a write is accepted), agent heartbeats, and, when
  replicas share agents, the sync that keeps this registry in step with the others' writes
  (`replica_sync`);
- `start_leading()` / `stop_leading()` — what exactly one replica may do at a time, the Lease
  holder: the sandbox reconciler (declarative objects, exits, expiry, agent loss, reset, expired
  record GC) and pool reconciling/scaling (starting and stopping agents).

`start()` does both for the embedded server, which is one replica that always leads. The
composition roots (`server.py`, `controller.py`) and the unit tests build the plane the same way,
with different backends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any

from fastsandbox._aio.tasks import TaskSet, guarded
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.fastpath.service import FastPathService
from fastsandbox.control.lifecycle import SandboxLifecycle
from fastsandbox.control.pools import PoolManager
from fastsandbox.control.recovery import RecoveryReport, recover
from fastsandbox.control.registry import AgentRecord, Registry
from fastsandbox.control.replica_sync import ReplicaSync
from fastsandbox.control.sandbox_reconciler import SandboxReconciler
from fastsandbox.control.sandboxes import SandboxService
from fastsandbox.errors import FsbError
from fastsandbox.fleet.base import AgentAuthFor, AgentFleet
from fastsandbox.metrics import Metrics
from fastsandbox.settings import DEFAULT_SANDBOX_DISK, DELETE_GRACE_SECONDS, SandboxDefaults
from fastsandbox.store.base import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PlaneSettings:
    delete_grace_seconds: float = DELETE_GRACE_SECONDS
    heartbeat_seconds: float = 1.0
    default_cpu: str = "1"
    default_memory: str = "512Mi"
    default_disk: str = DEFAULT_SANDBOX_DISK
    allowed_registries: frozenset[str] | None = None
    """Registries a sandbox's image or a pool's prewarm image may name (api/images.py). Both
    composition roots (`fsb server`, `fsb controller`) always pass one; None (no check) is
    for tests of the plane alone."""
    pool_resync_seconds: float = 2.0
    expired_retention_seconds: float = 24 * 3600.0
    agent_token: str | None = None
    """Bearer token sent to agents on a network address; unix sockets need none."""
    agent_auth: AgentAuthFor | None = None
    """Per-agent credentials (token, CA, certificate name) from the fleet (Kubernetes): wins
    over `agent_token`."""
    shared_agents: bool = False
    """Other control-plane replicas use the same agents and store (the Kubernetes controller):
    learn their agents from the fleet and their slots from the store's records."""
    scale_wait_seconds: float = 60.0
    """How long a create that finds its pool full waits for the pool to start an agent (while
    the pool is below poolMax) before it is refused."""
    agent_sync_seconds: float = 2.0
    """With `shared_agents`, how often the fleet is listed for agents other replicas started."""
    store_after_reply: bool = False
    """Fast mode stores a create's record once its answer has left, not while it is on its way
    (`SandboxService.store_after_reply`): for a store whose write is round trips (Kubernetes)."""
    creator_grace_seconds: float = 10.0
    """With `shared_agents`: how long the leader leaves a Pending record made through another
    replica's Fast-Path to that replica before it schedules the record itself."""

    @classmethod
    def of(cls, defaults: SandboxDefaults, **extra: Any) -> PlaneSettings:
        """The plane's settings from a composition root's (server or controller) settings."""
        return cls(
            delete_grace_seconds=defaults.delete_grace_seconds,
            heartbeat_seconds=defaults.heartbeat_seconds,
            default_cpu=defaults.default_sandbox_cpu,
            default_memory=defaults.default_sandbox_memory,
            default_disk=defaults.default_sandbox_disk,
            expired_retention_seconds=defaults.expired_retention_seconds,
            **extra,
        )

    rebuild_records: bool = True
    """Recovery writes the record of a container that carries its request but has none (a Fast
    create cut off before its write). With replicas the container may be another replica's
    create whose write is still on its way: that write then finds the rebuilt record (same uid)
    and keeps it (`SandboxService._persist`)."""


class ControlPlane:
    def _agent_counts(self) -> dict[tuple[str, ...], float]:
        agents = self.registry.agents()
        ready = sum(1 for a in agents if a.ready)
        return {("ready",): ready, ("unready",): len(agents) - ready}

    def _slot_counts(self) -> dict[tuple[str, ...], float]:
        # "used" is what this replica placed (its registry's slots, held from placement on),
        # not the agents' own counts: those arrive with the next heartbeat, so a scrape right
        # after a create would not yet see it.
        agents = self.registry.agents()
        return {
            ("capacity",): sum(a.capacity for a in agents),
            ("used",): sum(len(a.slots) for a in agents),
        }

    def __init__(self, store: ObjectStore, fleet: AgentFleet, settings: PlaneSettings) -> None:
        self.store = store
        self.fleet = fleet
        self.registry = Registry()
        self.clients = AgentClients(token=settings.agent_token, auth=settings.agent_auth)
        self.sandboxes = SandboxService(
            store,
            self.registry,
            self.clients,
            grace_seconds=settings.delete_grace_seconds,
            default_cpu=settings.default_cpu,
            default_memory=settings.default_memory,
            default_disk=settings.default_disk,
            allowed_registries=settings.allowed_registries,
            scale_wait_seconds=settings.scale_wait_seconds,
        )
        self.sandboxes.store_after_reply = settings.store_after_reply
        self.pools = PoolManager(
            store,
            self.registry,
            fleet,
            self.clients,
            heartbeat_seconds=settings.heartbeat_seconds,
        )
        self.pools.allowed_registries = settings.allowed_registries
        self.sandboxes.wait_for_room = self.pools.wait_for_room
        self.lifecycle = SandboxLifecycle(
            self.sandboxes, expired_retention_seconds=settings.expired_retention_seconds
        )
        self.reconciler = SandboxReconciler(self.lifecycle)
        self.registry.listeners.append(self._wake_sandboxes)
        self.servicer = FastPathService(self.sandboxes, self.pools, store)
        self.metrics = Metrics("control")
        self.servicer.metrics = self.metrics
        self.metrics.gauge(
            "fsb_agents", "Registered agents, by whether they answer heartbeats.", ("state",),
            self._agent_counts,
        )  # fmt: skip
        self.metrics.gauge(
            "fsb_slots", "Sandbox slots of the registered agents: capacity, and in use.",
            ("state",), self._slot_counts,
        )  # fmt: skip
        self.replicas = ReplicaSync(
            self.pools,
            self.sandboxes,
            leading=lambda: self.leading,
            interval=settings.agent_sync_seconds,
        )
        if settings.shared_agents:
            self.sandboxes.refresh_agents = self.replicas.refresh
            self.sandboxes.cache = self.replicas.cache
            self.pools.on_demand = self.replicas.note_demand
            self.lifecycle.creator_grace_seconds = settings.creator_grace_seconds
        self.leading = False
        self._settings = settings
        self._tasks = TaskSet()
        # The leader-only loops, also owned by `_tasks` (so closing it stops everything).
        self._leader_tasks: list[asyncio.Task[Any]] = []

    def _wake_sandboxes(self, agent: AgentRecord, sandbox_ids: set[str]) -> None:
        """An agent came or went, or reported exits: look at those sandboxes now."""
        if not self.leading:
            return  # a follower converges nothing; the leader's heartbeats see the same
        for sandbox_id in sandbox_ids:
            key = self.sandboxes.keys.get(sandbox_id)
            if key is not None:
                self.reconciler.enqueue(key)

    async def start(self) -> RecoveryReport:
        """One replica that always leads (embedded): recovery, then every loop."""
        report = await recover(
            self.pools,
            self.sandboxes,
            rebuild_records=self._settings.rebuild_records,
            settle=not self._settings.shared_agents,
        )
        await self.start_leading()
        self._serve()
        return report

    async def start_serving(self) -> RecoveryReport:
        """Every replica, before it serves the Fast-Path: recovery, heartbeats, replica sync."""
        report = await recover(
            self.pools,
            self.sandboxes,
            rebuild_records=self._settings.rebuild_records,
            settle=not self._settings.shared_agents,
        )
        self._serve()
        return report

    def _serve(self) -> None:
        self._tasks.spawn(guarded("heartbeats", self.pools.heartbeat_loop), name="heartbeats")
        if self._settings.shared_agents:
            self._tasks.spawn(guarded("agent-sync", self.replicas.agents_loop), name="agent-sync")
            self._tasks.spawn(
                guarded("record-sync", self.replicas.records_loop), name="record-sync"
            )
            pools_loop = functools.partial(
                self.replicas.cache.pools_loop, self.store, self._settings.agent_sync_seconds
            )
            self._tasks.spawn(guarded("pool-cache", pools_loop), name="pool-cache")

    async def start_leading(self, *, wait: bool = True) -> None:
        """Become the one replica that converges records and sizes pools. With `wait`, the first
        pool pass (and the agents it starts) completes before this returns."""
        if self.leading:
            return
        if self._settings.shared_agents:
            # Agents a previous leader started since our last look; from now on our own pool
            # passes register (and stop) agents.
            try:
                await self.replicas.sync_agents()
            except FsbError as exc:
                log.warning("agent sync before leading failed", extra={"err": str(exc)})
        self.leading = True
        if wait:
            await self.pools.reconcile_all()
        self._leader_tasks = [
            self._tasks.spawn(
                guarded(
                    "pools", lambda: self.pools.reconcile_loop(self._settings.pool_resync_seconds)
                ),
                name="pools",
            ),
            self._tasks.spawn(guarded("sandboxes", self.reconciler.run), name="sandboxes"),
        ]
        if self._settings.shared_agents:
            self._leader_tasks.append(
                self._tasks.spawn(guarded("demand", self.replicas.demand_loop), name="demand")
            )

    async def stop_leading(self) -> None:
        """Stop converging and scaling (another replica leads now); serving goes on."""
        self.leading = False
        tasks, self._leader_tasks = self._leader_tasks, []
        for task in tasks:
            task.cancel()
        # Keys still queued are looked at again in the next term: converging is idempotent.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop the loops and the fleet's supervision; sandboxes keep running."""
        self.leading = False
        await self._tasks.close()
        await self.sandboxes.flush()
        await self.sandboxes.events.close()
        await self.fleet.close()
        await self.clients.close()
