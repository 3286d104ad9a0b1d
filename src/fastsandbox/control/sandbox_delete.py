"""Deleting a sandbox (the `SandboxService` half that removes): the `fastsandbox.io/cleanup`
finalizer, the agent's confirmation before the slot is released, and giving up on an agent gone
longer than the sandbox's recovery timeout."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from fastsandbox._aio.keyed import KeyedLocks
from fastsandbox.api.labels import CLEANUP_FINALIZER
from fastsandbox.api.models import Sandbox, SandboxPhase
from fastsandbox.api.phases import transition
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.control.events import EventRecorder
from fastsandbox.control.registry import Registry
from fastsandbox.errors import Conflict, FsbError, NotFound
from fastsandbox.store.base import ObjectStore

log = logging.getLogger(__name__)


def _deleting(sb: Sandbox, grace: float) -> str:
    status = sb.status
    if not (status.assigned_agent and status.container_id):
        return "deletion requested; no container to stop"
    return (
        f"deletion requested; stopping container {status.container_id} on agent "
        f"{status.assigned_agent} (grace {grace:g}s)"
    )


class SandboxDeletion:
    """Needs the attributes below; `SandboxService` has them."""

    store: ObjectStore
    registry: Registry
    agents: AgentClients
    events: EventRecorder
    locks: KeyedLocks
    grace_seconds: float
    started_at: float

    # The service's own (`SandboxService._forget`): drops what it holds in memory for `sb`.
    _forget: Callable[[Sandbox], None]

    # -- delete ----------------------------------------------------------------------------
    async def delete(self, namespace: str, name: str, *, wait: bool) -> Sandbox | None:
        async with self.locks.hold((namespace, name)):
            sb = await self.store.get(Sandbox, namespace, name)
            if sb.metadata.deletion_timestamp is None:
                marked = await self.store.delete(Sandbox, namespace, name)
                if marked is None:
                    self._forget(sb)
                    return None
                sb = marked
            if sb.status.phase is not SandboxPhase.TERMINATING:
                transition(sb.status, SandboxPhase.TERMINATING)
                sb = await self.store.update_status(sb)
                self.events.record(sb, "Deleting", _deleting(sb, self.grace_seconds))
            if not wait and sb.status.assigned_agent:
                return sb
            if await self.finalize(sb) is not None:
                return sb  # the agent cannot confirm yet; the reconciler finishes it
            return None

    def unreachable_for(self, agent_name: str) -> float | None:
        """Seconds the agent has not answered (None while it answers). An agent the registry
        does not know at all counts from when this control plane started."""
        agent = self.registry.get_agent(agent_name)
        if agent is not None and agent.ready:
            return None
        since = agent.unready_since if agent is not None else None
        return time.monotonic() - (since if since is not None else self.started_at)

    async def finalize(self, sb: Sandbox) -> float | None:
        """Remove the container, then the slot, then the finalizer, in that order. Returns the
        seconds to wait before trying again while the agent cannot confirm; an agent gone for
        longer than the sandbox's recovery timeout is given up on (its container, should it
        come back, has no record any more and is the janitor's)."""
        agent_name, sandbox_id = sb.status.assigned_agent, sb.status.container_id
        if agent_name and sandbox_id:
            gone_for = self.unreachable_for(agent_name)
            if gone_for is None:
                agent = self.registry.agent(agent_name)
                try:
                    await self.agents.get(agent.target).delete(sandbox_id, self.grace_seconds)
                except FsbError as exc:
                    self.events.warning(sb, "DeleteFailed", f"{exc.message}; retrying")
                    raise
            elif gone_for < sb.spec.recovery_timeout_seconds:
                self.events.warning(
                    sb,
                    "DeletePending",
                    f"agent {agent_name} does not answer: the record stays until it confirms "
                    f"the container is gone, or for recoveryTimeoutSeconds "
                    f"({sb.spec.recovery_timeout_seconds}s)",
                )
                return sb.spec.recovery_timeout_seconds - gone_for
            else:
                log.warning(
                    "agent gone; released without its confirmation",
                    extra={
                        "sandbox": f"{sb.metadata.namespace}/{sb.metadata.name}",
                        "agent": agent_name,
                    },
                )
                # Should the agent come back, its first heartbeat stops the container: a
                # deleted sandbox never runs again.
                self.registry.give_up(agent_name, sandbox_id)
            self.registry.release(agent_name, sandbox_id)
        if CLEANUP_FINALIZER in sb.metadata.finalizers:
            sb.metadata.finalizers = [f for f in sb.metadata.finalizers if f != CLEANUP_FINALIZER]
            with contextlib.suppress(NotFound):
                try:
                    await self.store.update(sb)
                except Conflict:
                    # Written meanwhile (on Kubernetes, another replica may be finalizing it
                    # too): the container is gone either way; take the finalizer off what is
                    # there now, if it is still on (and still this object, not a new one).
                    current = await self.store.get(Sandbox, sb.metadata.namespace, sb.metadata.name)
                    same = current.metadata.uid == sb.metadata.uid
                    if same and CLEANUP_FINALIZER in current.metadata.finalizers:
                        current.metadata.finalizers.remove(CLEANUP_FINALIZER)
                        await self.store.update(current)
        self._forget(sb)
        return None
