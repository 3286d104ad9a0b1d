"""Placing a sandbox and starting its container (the `SandboxService` half every start shares:
a Fast or Strong create, a declarative object, a reset or an AutoRecreate): take a slot, ask the
agent to start the container, and mark the record Running. An agent that refuses for capacity is
skipped for the next candidate; a pool with no room that may still grow is waited for; a failure
after the slot was taken releases it (and removes the container when it was started)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from fastsandbox.api import labels
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
from fastsandbox.api.images import PullCredentials, check_registry
from fastsandbox.api.models import NetworkMode, Sandbox, SandboxPhase, SandboxPool, Timings, now
from fastsandbox.api.phases import set_condition, transition
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.create_request import new_sandbox_id, request_label
from fastsandbox.control.events import EventRecorder
from fastsandbox.control.limits import Limits, effective_limits, server_defaults
from fastsandbox.control.registry import Allocation, Registry
from fastsandbox.errors import CapacityExhausted, FsbError, NotFound, Unavailable
from fastsandbox.store.base import ObjectStore

log = logging.getLogger(__name__)

# The pull credentials of the create being served in this task (and the task it spawns), set by
# `create` from the request; None everywhere else.
PULL_CREDENTIALS: contextvars.ContextVar[PullCredentials | None] = contextvars.ContextVar(
    "pull_credentials", default=None
)

# Conditions that describe the previous container; a new one starts without them.
_RESET_ON_START = frozenset({"Ready", "Scheduled", "AgentReachable"})


def ms_since(since: float) -> float:
    """Milliseconds from `since` (a `time.perf_counter()` reading) to now, for `Timings`."""
    return round((time.perf_counter() - since) * 1000, 3)


def _after(ms: float | None) -> str:
    return f" after {ms:.1f} ms" if ms else ""


class SandboxStart:
    """Needs the attributes below; `SandboxService` has them (what each is: its `__init__`)."""

    store: ObjectStore
    registry: Registry
    agents: AgentClients
    events: EventRecorder
    keys: dict[str, tuple[str, str]]
    default_cpu: str
    default_memory: str
    default_disk: str
    allowed_registries: frozenset[str] | None
    refresh_agents: Callable[[str, str], Awaitable[bool]] | None
    wait_for_room: Callable[[str, str, str, float, str], Awaitable[None]] | None

    async def _start(
        self, stored: Sandbox, arrived: float, timings: Timings, *, until: float | None = None
    ) -> Sandbox:
        """Place and start a sandbox whose record already exists (Strong mode, declarative).
        With `until`, a full pool that may still grow is waited for (a create's caller); the
        reconciler passes none: its records wait as Unschedulable instead."""
        allocation, state = await self._place(stored, arrived, timings, until=until)
        timings.runtime_ready_ms = ms_since(arrived)
        self.mark_running(stored, allocation, state, timings)
        try:
            running = await self.store.update_status(stored)
        except BaseException:
            await self._remove_container(allocation)
            raise
        self._record_started(running)
        return running

    def _record_started(self, sb: Sandbox) -> None:
        """Scheduled and Started, once the record says so (events of unstored objects are
        dropped)."""
        status, timings = sb.status, sb.status.timings or Timings()
        where = status.assigned_agent + (f" ({status.agent_ip})" if status.agent_ip else "")
        self.events.record(
            sb, "Scheduled", f"assigned to agent {where}{_after(timings.scheduled_ms)}"
        )
        self.events.record(
            sb,
            "Started",
            f"container {status.container_id} running{_after(timings.runtime_ready_ms)}",
        )

    async def _place(
        self,
        sb: Sandbox,
        arrived: float,
        timings: Timings,
        *,
        until: float | None = None,
        pool_record: SandboxPool | None = None,
        label: Sequence[agent_pb2.KeyValue] | None = None,
    ) -> tuple[Allocation, agent_pb2.SandboxState]:
        """Take a slot and start the container there. An agent that refuses for capacity is
        skipped for the next candidate: its own count is the truth, and ours lags behind creates
        made meanwhile by other control-plane replicas (Kubernetes) or unknown orphans. When no
        candidate is left, the pool is waited for (with `until`, while it may grow), and
        otherwise the last refusal is the answer (RESOURCE_EXHAUSTED)."""
        ns, pool = sb.metadata.namespace, sb.spec.pool_ref
        refused: set[str] = set()
        last: CapacityExhausted | None = None
        refreshed = self.refresh_agents is None
        # Before a slot is taken: a limit above the pool's maximum, or an image from a registry
        # we do not pull from, is refused with nothing made.
        if self.allowed_registries is not None:
            check_registry(sb.spec.image, self.allowed_registries, "spec.image")
        if pool_record is None:
            with contextlib.suppress(NotFound):
                pool_record = await self.store.get(SandboxPool, ns, sb.spec.pool_ref)
        limits = await self.limits(sb, pool_record)
        # Private sandboxes publish their ports each on a host port of its own.
        exclusive = pool_record is None or pool_record.spec.network_mode is NetworkMode.SHARED
        waited_from: float | None = None
        while True:
            try:
                allocation = self._allocate(sb, exclude=refused, exclusive_ports=exclusive)
            except CapacityExhausted as exc:
                if not refreshed:
                    refreshed = True
                    assert self.refresh_agents is not None
                    if await self.refresh_agents(ns, pool):
                        continue
                answer = last or exc
                if until is None or self.wait_for_room is None:
                    raise answer from None
                if waited_from is None:
                    waited_from = time.perf_counter()
                    log.info(
                        "pool has no free slot; waiting for it to grow",
                        extra={"sandbox": f"{ns}/{sb.metadata.name}", "pool": pool},
                    )
                await self.wait_for_room(ns, pool, sb.metadata.name, until, answer.message)
                # Room may have come anywhere: agents that refused are asked again, and with
                # replicas the fleet is listed again (at most every REFRESH_SPACING).
                refused.clear()
                last = None
                refreshed = self.refresh_agents is None
                continue
            timings.scheduled_ms = ms_since(arrived)
            if waited_from is not None:
                timings.scaled_ms = ms_since(waited_from)
            try:
                state = await self._run_on_agent(sb, allocation, limits, label)
                if state.pulled_ms:
                    timings.pulled_ms = round(state.pulled_ms, 3)
                if state.warm:
                    timings.warm = True
                return allocation, state
            except CapacityExhausted as exc:
                self.registry.release(allocation.agent, allocation.sandbox_id)
                refused.add(allocation.agent)
                last = exc
                log.info(
                    "agent refused for capacity; trying the next one",
                    extra={"sandbox": sb.metadata.name, "agent": allocation.agent},
                )
            except BaseException:
                self.registry.release(allocation.agent, allocation.sandbox_id)
                raise

    def _allocate(
        self, sb: Sandbox, exclude: set[str] | None = None, *, exclusive_ports: bool = True
    ) -> Allocation:
        return self.registry.allocate(
            namespace=sb.metadata.namespace,
            pool=sb.spec.pool_ref,
            image=sb.spec.image,
            ports=sb.spec.exposed_ports,
            sandbox_id=new_sandbox_id(sb.metadata.name),
            exclude=exclude,
            exclusive_ports=exclusive_ports,
        )

    async def limits(self, sb: Sandbox, pool: SandboxPool | None = None) -> Limits:
        """The sandbox's limits from its spec, its pool's defaults and maximum, and ours."""
        if pool is None:
            try:
                pool = await self.store.get(SandboxPool, sb.metadata.namespace, sb.spec.pool_ref)
            except NotFound:
                pool = None  # placement says so, naming the pool
        return effective_limits(
            sb.spec.resources,
            pool.spec if pool is not None else None,
            server_defaults(self.default_cpu, self.default_memory, self.default_disk),
        )

    def runtime_spec(
        self,
        sb: Sandbox,
        sandbox_id: str,
        limits: Limits | None = None,
        label: Sequence[agent_pb2.KeyValue] | None = None,
    ) -> agent_pb2.SandboxRuntimeSpec:
        """What the agent gets; `label`: `request_label(sb)` when the caller has built it."""
        spec = sb.spec
        creds = PULL_CREDENTIALS.get()
        if limits is None:
            fallback = server_defaults(self.default_cpu, self.default_memory, self.default_disk)
            limits = effective_limits(spec.resources, None, fallback)
        return agent_pb2.SandboxRuntimeSpec(
            sandbox_id=sandbox_id,
            namespace=sb.metadata.namespace,
            name=sb.metadata.name,
            image=spec.image,
            command=spec.command,
            args=spec.args,
            env=[agent_pb2.KeyValue(key=e.name, value=e.value) for e in spec.env],
            working_dir=spec.working_dir,
            exposed_ports=spec.exposed_ports,
            labels=[
                agent_pb2.KeyValue(key=labels.UID_LABEL, value=sb.metadata.uid),
                agent_pb2.KeyValue(key=labels.POOL_LABEL, value=spec.pool_ref),
                *(request_label(sb) if label is None else label),
            ],
            cpu_millis=limits.cpu_millis,
            memory_bytes=limits.memory_bytes,
            pids_limit=limits.pids,
            disk_bytes=limits.disk_bytes,
            log_max_bytes=limits.log_max_bytes,
            pull_username=creds.username if creds else "",
            pull_password=creds.password if creds else "",
        )

    async def _run_on_agent(
        self,
        sb: Sandbox,
        allocation: Allocation,
        limits: Limits | None = None,
        label: Sequence[agent_pb2.KeyValue] | None = None,
    ) -> agent_pb2.SandboxState:
        client = self.agents.get(allocation.target)
        try:
            spec = self.runtime_spec(sb, allocation.sandbox_id, limits, label)
            return await client.create(spec)
        except CapacityExhausted:
            # The agent is the capacity authority; our view was stale (e.g. an unknown orphan).
            raise
        except Unavailable:
            # It may have started the container before the connection broke.
            await self._remove_container(allocation)
            raise
        except asyncio.CancelledError:
            # Our caller went away (its client hung up): the agent finishes a create whatever
            # happens to the call, so the container is taken back here, as nobody will record it.
            await asyncio.shield(self._remove_container(allocation))
            raise

    def mark_running(
        self,
        sb: Sandbox,
        allocation: Allocation,
        state: agent_pb2.SandboxState,
        timings: Timings,
    ) -> None:
        status = sb.status
        transition(status, SandboxPhase.RUNNING)
        status.assigned_agent = allocation.agent
        status.agent_ip = allocation.ip
        # A private sandbox's ports are published on host ports its agent chose (the label);
        # a shared one's are the declared ports on the agent's address.
        published = next((kv.value for kv in state.labels if kv.key == labels.PUBLISHED_LABEL), "")
        status.endpoints = (
            labels.published_endpoints(allocation.ip, published)
            if published
            else allocation.endpoints
        )
        status.container_id = state.container_id or allocation.sandbox_id
        status.started_at = now()
        status.exit_code = None
        status.timings = timings
        status.message = ""
        status.observed_reset_revision = sb.spec.reset_revision
        status.conditions = [c for c in status.conditions if c.type not in _RESET_ON_START]
        set_condition(status, "Ready", True, reason="Started")
        # The agent has just answered: the reconciler's first pass over this record then finds
        # nothing to write (one store write, watch event and pass fewer per create).
        set_condition(status, "AgentReachable", True, reason="Started")
        self.keys[status.container_id] = (sb.metadata.namespace, sb.metadata.name)

    async def _remove_container(self, allocation: Allocation) -> None:
        try:
            await self.agents.get(allocation.target).delete(allocation.sandbox_id, 0)
        except FsbError:
            log.exception(
                "could not remove container after a failed create",
                extra={"sandbox_id": allocation.sandbox_id, "agent": allocation.agent},
            )
            return  # keep the slot: the container may still exist
        self.registry.release(allocation.agent, allocation.sandbox_id)
