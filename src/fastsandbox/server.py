"""The composition root: the one place that picks backends and wires the embedded server.

`fsb server` = SQLite store + local fleet (agents as processes) + the control plane + the
Fast-Path. Start order: data dir, admin token and TLS → containerd → store → default pool → recovery
(rebuild the registry from records and agents) → background loops → janitor → Fast-Path (only
now are writes accepted) → "ready". Shutdown is the reverse, and never stops a sandbox: containers
belong to containerd's shims and keep running until the next start adopts them.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import grpc

from fastsandbox._addr import listen_host
from fastsandbox._aio.signals import run_until_stopped
from fastsandbox._aio.tasks import TaskSet, guarded
from fastsandbox.agent.runtime import containerd_daemon
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.api.images import allowed_registries
from fastsandbox.api.models import ObjectMeta, PoolCapacity, SandboxPool, SandboxPoolSpec
from fastsandbox.control.fastpath.access import AccessGuard
from fastsandbox.control.fastpath.auth import load_or_create_token
from fastsandbox.control.fastpath.authz import NamespaceAuthorizer, TokenAuthenticator
from fastsandbox.control.fastpath.serve import start_fastpath
from fastsandbox.control.fastpath.tls import (
    TlsMaterial,
    data_dir_tls,
    operator_tls,
    server_names,
    write_private,
)
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, Unavailable
from fastsandbox.fleet.local import LocalFleet
from fastsandbox.janitor.containerd import ContainerdLeftovers
from fastsandbox.janitor.embedded import EmbeddedKnownState, pinned_images
from fastsandbox.janitor.images import ImageCollector
from fastsandbox.janitor.janitor import Janitor
from fastsandbox.logconfig import configure
from fastsandbox.metrics import HealthState, MetricsServer, serve_metrics
from fastsandbox.settings import ServerSettings
from fastsandbox.store.base import ObjectStore
from fastsandbox.store.faults import DelayFile
from fastsandbox.store.sqlite import SqliteStore
from fastsandbox.store.tokens_sqlite import SqliteTokenStore

log = logging.getLogger(__name__)

DEFAULT_POOL = "default-pool"
# Where containerd's clients (`ctr`, the Go client) make task FIFOs, whichever containerd they
# talk to (`defaults.DefaultFIFODir`). Our sandboxes use file:// logs and have none.
FIFO_DIR = Path("/run/containerd/fifo")


# The default pool's agents each run this many sandboxes: one agent is one asyncio process, and
# 16 keeps its create queue short while four agents cover 64 sandboxes.
DEFAULT_POOL_PER_AGENT = 16
# Sandboxes the default pool serves at least, whatever the machine.
DEFAULT_POOL_MIN_SLOTS = 64
# Per core and per memory: an idle sandbox costs a containerd shim and its supervisor (~10 MiB);
# 64 MiB each leaves room for what runs inside. The larger machine gets the larger pool.
SLOTS_PER_CPU = 32
MEMORY_PER_SLOT = 64 * 1024 * 1024
# What the default pool was before it was sized from the machine: an untouched one is resized.
_OLD_DEFAULT = SandboxPoolSpec(
    capacity=PoolCapacity(pool_min=1, pool_max=1), max_sandboxes_per_agent=5
)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def default_pool_spec(cpus: int | None = None, memory_bytes: int | None = None) -> SandboxPoolSpec:
    """One agent always (poolMin 1); poolMax so that poolMax x 16 slots cover
    max(64, min(32 per core, one per 64 MiB of memory)): 4 agents (64 slots) on 2 cores, 16
    agents (256) on 8 cores with 16 GiB. Agents beyond the first start on demand and drain
    back when idle."""
    cpus = cpus or os.cpu_count() or 1
    memory = _memory_bytes() if memory_bytes is None else memory_bytes
    by_machine = SLOTS_PER_CPU * cpus
    if memory:
        by_machine = min(by_machine, memory // MEMORY_PER_SLOT)
    slots = max(DEFAULT_POOL_MIN_SLOTS, by_machine)
    return SandboxPoolSpec(
        capacity=PoolCapacity(pool_min=1, pool_max=-(-slots // DEFAULT_POOL_PER_AGENT)),
        max_sandboxes_per_agent=DEFAULT_POOL_PER_AGENT,
    )


async def ensure_default_pool(store: ObjectStore) -> None:
    try:
        current = await store.get(SandboxPool, "default", DEFAULT_POOL)
    except NotFound:
        pool = SandboxPool(
            metadata=ObjectMeta(name=DEFAULT_POOL, namespace="default"),
            spec=default_pool_spec(),
        )
        try:
            await store.create(pool)
            cap = pool.spec.capacity
            log.info(
                "created the default pool",
                extra={
                    "pool": DEFAULT_POOL,
                    "agents": f"{cap.pool_min}..{cap.pool_max}",
                    "per_agent": pool.spec.max_sandboxes_per_agent,
                },
            )
        except AlreadyExists:
            pass
        return
    if current.spec == _OLD_DEFAULT:
        # Made by an earlier version with its fixed 1 x 5 size, never changed since.
        current.spec = default_pool_spec()
        try:
            await store.update(current)
            log.info("resized the default pool to the machine", extra={"pool": DEFAULT_POOL})
        except Conflict:
            pass


def check_local_pool(pool: SandboxPool) -> None:
    """Fields only agents as Pods honour (`fsb controller`): refused here, where agents are
    processes of this server, instead of stored and silently ignored."""
    spec = pool.spec
    if spec.agent_resources.cpu or spec.agent_resources.memory:
        raise InvalidArgument(
            "spec.agentResources: only agents run as Kubernetes Pods (fsb controller) take "
            "resources; fsb server runs agents as processes: leave it unset"
        )
    if spec.agent_template is not None:
        raise InvalidArgument(
            "spec.agentTemplate: a Pod template applies only to agents run as Kubernetes Pods "
            "(fsb controller); fsb server runs agents as processes: leave it unset"
        )


def _lock_data_dir(data_dir: Path) -> IO[str]:
    """One server per data dir: two would both adopt the same agents and containers."""
    lock = open(data_dir / "server.lock", "w")  # noqa: SIM115 - held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise Unavailable(
            f"another fsb server is running with data dir {data_dir}; stop it or use --data-dir"
        ) from None
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


async def _start_janitor(
    settings: ServerSettings,
    plane: ControlPlane,
    fleet: LocalFleet,
    containerd: containerd_daemon.Containerd,
    tasks: TaskSet,
) -> list[ContainerdRuntime | ContainerdLeftovers]:
    """Start the janitor over our containerd namespace; it frees the registry slot of every
    orphan it removes (recovery gave live containers without a record a slot)."""
    registry = plane.registry

    def release(sandbox_id: str) -> None:
        holder = registry.holder(sandbox_id)
        if holder is not None:
            registry.release(holder.name, sandbox_id)

    known = EmbeddedKnownState(
        plane.store,
        agents=lambda: [a.name for a in registry.agents()],
        held=lambda: [sid for a in registry.agents() for sid in a.slots],
        release=release,
    )
    await known.prime()
    runtime = ContainerdRuntime(containerd.socket, fleet.containerd_namespace)
    leftovers = ContainerdLeftovers(containerd.socket, fleet.containerd_namespace)
    janitor = Janitor(
        runtime,
        known,
        orphan_timeout=settings.orphan_timeout_seconds,
        interval=settings.janitor_interval_seconds,
        in_flight=known.in_flight,
        on_removed=known.removed,
        agents_dir=fleet.agents_dir,
        leftovers=leftovers,
        fifo_dir=FIFO_DIR,
        images=ImageCollector(
            leftovers,
            budget_bytes=settings.image_cache_max_bytes,
            pinned=lambda: pinned_images(plane.store),
        ),
    )
    tasks.spawn(guarded("janitor", janitor.run), name="janitor")
    return [runtime, leftovers]


def fastpath_tls(settings: ServerSettings) -> TlsMaterial | None:
    """The operator's certificate, else one from our CA in the data dir; None for --insecure."""
    if settings.insecure:
        return None
    if settings.tls_cert is not None and settings.tls_key is not None:
        return operator_tls(settings.tls_cert, settings.tls_key)
    return data_dir_tls(settings.tls_dir, server_names(settings.listen))


def write_client_info(settings: ServerSettings, tls: TlsMaterial | None) -> None:
    """`<data-dir>/client.json`: how a client on this machine reaches this server (address,
    TLS or not); with `tls/ca.crt` and `token` it is all `fsb` and the SDK need."""
    host = listen_host(settings.listen)
    port = settings.listen.rpartition(":")[2]
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host:
        host = f"[{host}]"
    info = {"endpoint": f"{host}:{port}", "tls": tls is not None}
    write_private(settings.data_dir / "client.json", (json.dumps(info) + "\n").encode())


async def run(
    settings: ServerSettings,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event,
    announce: Callable[[str], None] | None = None,
) -> None:
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    lock = _lock_data_dir(data_dir)
    token = load_or_create_token(settings.token_path, settings.token)
    tls = fastpath_tls(settings)
    tokens = await SqliteTokenStore.open(settings.tokens_db_path)

    containerd = await containerd_daemon.ensure(data_dir, settings.containerd_socket)
    delay = settings.fault_store_delay_file
    store = await SqliteStore.open(
        settings.db_path, write_delay=DelayFile(delay) if delay is not None else None
    )
    fleet = LocalFleet(
        data_dir=data_dir,
        containerd_socket=containerd.socket,
        network=settings.network,
        insecure_registries=settings.insecure_registries,
        grace_seconds=settings.delete_grace_seconds,
        log=settings.log,
        default_cpu=settings.default_sandbox_cpu,
        default_memory=settings.default_sandbox_memory,
    )
    registries = allowed_registries(settings.allowed_registries, settings.insecure_registries)
    plane = ControlPlane(store, fleet, PlaneSettings.of(settings, allowed_registries=registries))
    plane.pools.check_pool = check_local_pool
    server: grpc.aio.Server | None = None
    health = HealthState(reason="recovering: asking agents what they run")
    metrics: MetricsServer | None = None
    janitor_tasks = TaskSet()
    janitor_clients: list[ContainerdRuntime | ContainerdLeftovers] = []
    try:
        if settings.default_pool:
            await ensure_default_pool(store)
        # Before recovery: /readyz answers 503 with the reason while it runs.
        metrics = await serve_metrics(plane.metrics, health, settings.metrics_listen)
        report = await plane.start()
        janitor_clients = await _start_janitor(settings, plane, fleet, containerd, janitor_tasks)

        authenticator = TokenAuthenticator(token, tokens)
        plane.servicer.token_store = tokens
        plane.servicer.token_revoked = authenticator.forget
        guard = AccessGuard(authenticator, NamespaceAuthorizer())
        server = await start_fastpath(plane.servicer, guard, settings.listen, tls, settings.edge)
        write_client_info(settings, tls)
        message = (
            f"fsb server ready on {settings.listen} ({'TLS' if tls else 'plaintext'}, "
            f"data dir {data_dir}, "
            f"{report.agents} agent(s), {report.records} sandbox record(s))"
        )
        log.info("ready", extra={"listen": settings.listen, "data_dir": str(data_dir)})
        health.ready()
        if announce is not None:
            announce(message)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping")
    finally:
        health.not_ready("stopping")
        if server is not None:
            await server.stop(grace=3)
        if metrics is not None:
            await metrics.stop()
        await janitor_tasks.close()
        for client in janitor_clients:
            await client.close()
        await plane.close()
        await store.close()
        await tokens.close()
        await containerd.stop()
        lock.close()
        log.info("stopped")


def main(settings: ServerSettings) -> int:
    """Entry point of `fsb server`: configure logs, run until SIGTERM/SIGINT, exit code."""
    configure(settings.log, component="server")

    def announce(message: str) -> None:
        sys.stdout.write(message + "\n")
        sys.stdout.write(
            "try: fsb run demo --image 127.0.0.1:5000/busybox:latest -- echo hello\n"
            "     fsb logs demo\n"
        )
        sys.stdout.flush()

    return run_until_stopped(lambda stop: run(settings, stop=stop, announce=announce))
