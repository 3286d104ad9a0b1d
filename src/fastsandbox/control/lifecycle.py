"""Converging one sandbox record: the lifecycle rules that run after the create.

`converge(key)` runs in the sandbox's serial section and looks at the record together with what
its agent last reported, in this order:

1. deletion requested → finalize (container, slot, finalizer);
   a lease (`spec.leaseSeconds`) not renewed in time → the same deletion (control/leases.py);
2. past `expireTime` → delete the container gracefully, keep the record as `Expired` without an
   agent (deleted for good after the retention period);
3. never placed (`Pending`) → schedule and start;
4. agent unreachable → condition `AgentReachable=False` at once; only after
   `recoveryTimeoutSeconds`: `Manual` → `Lost` (never rescheduled by itself), `AutoRecreate` → a new
   container on another agent, same name. An agent that answers again in time keeps its sandbox;
5. the process exited → `Succeeded` (0) or `Failed` (exit code, reason such as `OOMKilled`), and
   the slot is freed while the record stays; its container, snapshot and writable layer are
   removed on the agent, its capped log kept there until the record is deleted;
6. a new `spec.resetRevision` → a new container from the same spec (fresh rootfs), then
   `status.observedResetRevision`.

It returns how long until the record needs another look (the expiry deadline, the lease's lapse,
the end of a recovery timeout), so timers fire on time instead of on a coarse poll.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, timedelta

from fastsandbox.api.labels import CLEANUP_FINALIZER
from fastsandbox.api.models import (
    FailurePolicy,
    Sandbox,
    SandboxPhase,
    Timings,
    now,
)
from fastsandbox.api.phases import HOLDS_SLOT, condition, set_condition, transition
from fastsandbox.control.leases import lease_lapses_at, lease_left
from fastsandbox.control.sandbox_start import ms_since
from fastsandbox.control.sandboxes import MODE, Key, SandboxService
from fastsandbox.errors import CapacityExhausted, FsbError, InvalidArgument, NotFound

log = logging.getLogger(__name__)

P = SandboxPhase
# Phases of a sandbox whose process has ended: nothing of it runs, only its log is wanted.
EXITED = frozenset({P.SUCCEEDED, P.FAILED})


class SandboxLifecycle:
    def __init__(self, service: SandboxService, *, expired_retention_seconds: float) -> None:
        self.service = service
        self.store = service.store
        self.registry = service.registry
        self.events = service.events
        self.expired_retention = expired_retention_seconds
        # With several control-plane replicas: how long a Pending record made through a
        # Fast-Path (it carries the consistency-mode annotation) is left to the replica that is
        # creating it, which holds no lock this replica could see. Past it, the creator is
        # taken for dead and the record is scheduled here.
        self.creator_grace_seconds = 0.0

    async def converge(self, key: Key) -> float | None:
        async with self.service.locks.hold(key):
            try:
                sb = await self.store.get(Sandbox, *key)
            except NotFound:
                return None
            if sb.metadata.deletion_timestamp is not None:
                return await self.service.finalize(sb)
            if CLEANUP_FINALIZER not in sb.metadata.finalizers:
                sb.metadata.finalizers.append(CLEANUP_FINALIZER)
                sb = await self.store.update(sb)
            return await self._converge(sb)

    async def _converge(self, sb: Sandbox) -> float | None:
        lease = lease_left(sb)
        if lease is not None and lease <= 0:
            return await self._lease_lapsed(sb)
        wait = await self._converge_unleased(sb)
        if lease is not None:
            wait = lease if wait is None else min(wait, lease)
        return wait

    async def _converge_unleased(self, sb: Sandbox) -> float | None:
        status = sb.status
        if status.phase is P.EXPIRED:
            return await self._collect_expired(sb)
        expire = sb.spec.expire_time
        if expire is not None and now() >= expire:
            await self._expire(sb)
            return self.expired_retention
        wait: float | None = None
        if status.phase is P.PENDING and not status.assigned_agent:
            wait = await self._schedule(sb)
        elif status.assigned_agent and status.container_id and status.phase in HOLDS_SLOT:
            wait = await self._watch_agent(sb)
        elif sb.spec.reset_revision != status.observed_reset_revision:
            # Exited, or lost and left alone: a reset starts it again.
            wait = await self._reset(sb)
        elif status.phase in EXITED and status.assigned_agent and status.container_id:
            await self._remove_exited(sb)
        if expire is not None:
            until = (expire - now()).total_seconds()
            wait = until if wait is None else min(wait, until)
        return wait

    async def _save(self, sb: Sandbox) -> None:
        """Write the status and keep `sb` current, so the next write in this pass is not a
        conflict with our own previous one."""
        stored = await self.store.update_status(sb)
        sb.metadata.resource_version = stored.metadata.resource_version

    # -- placement ---------------------------------------------------------------------------
    async def _schedule(self, sb: Sandbox) -> float | None:
        created = sb.metadata.creation_timestamp or now()
        if self.creator_grace_seconds and MODE in sb.metadata.annotations:
            left = self.creator_grace_seconds - (now() - created).total_seconds()
            if left > 0:
                return left
        arrived = time.perf_counter() - max((now() - created).total_seconds(), 0.0)
        timings = sb.status.timings or Timings(accepted_ms=ms_since(arrived))
        return await self._start_or_wait(sb, arrived, timings)

    async def _start_or_wait(self, sb: Sandbox, arrived: float, timings: Timings) -> float | None:
        try:
            await self.service._start(sb, arrived, timings)
        except CapacityExhausted as exc:
            # Every retry is recorded: the store counts repeats into one event.
            self.events.warning(sb, "Unschedulable", str(exc))
            if set_condition(
                sb.status, "Scheduled", False, reason="Unschedulable", message=str(exc)
            ):
                sb.status.message = str(exc)
                await self._save(sb)
            return 2.0
        except InvalidArgument as exc:
            # A declarative record the pool cannot take as written (a limit above its
            # sandboxMax): retrying cannot help; a changed spec brings it back here.
            self.events.warning(sb, "InvalidSpec", exc.message)
            if set_condition(
                sb.status, "Scheduled", False, reason="InvalidSpec", message=exc.message
            ):
                sb.status.message = exc.message
                await self._save(sb)
            return None
        except FsbError as exc:
            self.events.warning(sb, "FailedStart", f"{exc.message}; retrying")
            raise
        return None

    # -- running -----------------------------------------------------------------------------
    async def _watch_agent(self, sb: Sandbox) -> float | None:
        status = sb.status
        gone_for = self.service.unreachable_for(status.assigned_agent)
        if gone_for is not None:
            return await self._agent_unreachable(sb, gone_for)
        before = condition(status, "AgentReachable")
        # A True condition stays as it is (its reason says since when: Started or Heartbeat).
        changed = before is None or before.status != "True"
        if changed:
            set_condition(status, "AgentReachable", True, reason="Heartbeat")
        was_lost = status.phase is P.LOST
        if was_lost:
            transition(status, P.RUNNING, reason="AgentReturned")
            changed = True
        if was_lost or (before is not None and before.status == "False"):
            self.events.record(
                sb,
                "AgentReturned",
                f"agent {status.assigned_agent} answers again; container {status.container_id} "
                "kept",
            )
        agent = self.registry.agent(status.assigned_agent)
        report = agent.reports.get(status.container_id)
        if report is not None and report.exited and status.phase is P.RUNNING:
            self._exited(sb, report.exit_code, report.reason)
            changed = True
        if changed:
            await self._save(sb)
        if sb.spec.reset_revision != status.observed_reset_revision:
            return await self._reset(sb)
        if status.phase in EXITED:
            await self._remove_exited(sb)
        return None

    async def _remove_exited(self, sb: Sandbox) -> None:
        """An exited sandbox's container, snapshot and writable layer go as soon as its exit is
        recorded; its capped log stays on the agent (readable) until the record is deleted.
        Runs again on the next look while the agent still reports the container (an agent that
        did not answer this time), so it needs no state of its own."""
        status = sb.status
        agent = self.registry.get_agent(status.assigned_agent)
        if agent is None or self.service.unreachable_for(status.assigned_agent) is not None:
            return
        if status.container_id not in agent.reports:
            return  # already removed (or never reported): nothing on the agent to free
        try:
            await self.service.agents.get(agent.target).delete(
                status.container_id, 0, keep_logs=True
            )
        except FsbError as exc:
            log.warning(
                "removing an exited container failed; retried on the next look",
                extra={"sandbox": _name(sb), "err": exc.message},
            )
            return
        agent.reports.pop(status.container_id, None)
        log.info(
            "exited container removed, log kept",
            extra={"sandbox": _name(sb), "container": status.container_id},
        )

    def _exited(self, sb: Sandbox, code: int, reason: str) -> None:
        status = sb.status
        ok = code == 0
        why = reason or ("Completed" if ok else "Error")
        transition(status, P.SUCCEEDED if ok else P.FAILED, reason=why)
        status.exit_code = code
        set_condition(status, "Ready", False, reason=why, message=f"exit code {code}")
        # Its slot and ports are free for others now; the stopped container goes next
        # (`_remove_exited`), its log stays until the record is deleted.
        self.registry.release(status.assigned_agent, status.container_id)
        self.events.record(
            sb,
            "Exited",
            f"container {status.container_id} exited with code {code} ({why})",
            type_="Normal" if ok else "Warning",
        )
        log.info(
            "sandbox exited",
            extra={"sandbox": _name(sb), "exit_code": code, "reason": why},
        )

    async def _agent_unreachable(self, sb: Sandbox, gone_for: float) -> float | None:
        status = sb.status
        timeout = sb.spec.recovery_timeout_seconds
        before = condition(status, "AgentReachable")
        if set_condition(
            status,
            "AgentReachable",
            False,
            reason="HeartbeatMissed",
            message=f"agent {status.assigned_agent} has not answered for {gone_for:.0f}s",
        ):
            await self._save(sb)
            if before is None or before.status != "False":
                self.events.warning(
                    sb,
                    "AgentUnreachable",
                    f"agent {status.assigned_agent} has not answered for {gone_for:.0f}s; "
                    f"waiting recoveryTimeoutSeconds ({timeout}s) for it",
                )
        if gone_for < timeout:
            return timeout - gone_for
        lost = (
            f"agent {status.assigned_agent} did not answer for recoveryTimeoutSeconds ({timeout}s)"
        )
        if sb.spec.failure_policy is FailurePolicy.MANUAL:
            if sb.spec.reset_revision != status.observed_reset_revision:
                # The user asked for a new container: the lost one is given up on.
                if not _retrying_start(sb):
                    self.events.record(
                        sb,
                        "Reset",
                        f"{lost}: container {status.container_id} given up; starting a new "
                        f"one (spec.resetRevision {sb.spec.reset_revision})",
                    )
                self.registry.give_up(status.assigned_agent, status.container_id)
                self.service.keys.pop(status.container_id, None)
                return await self._restart(sb)
            if status.phase is not P.LOST:
                transition(status, P.LOST, reason="AgentLost")
                set_condition(status, "Ready", False, reason="AgentLost")
                await self._save(sb)
                self.events.warning(
                    sb,
                    "AgentLost",
                    f"{lost}; failurePolicy Manual: Lost, not rescheduled "
                    "(`fsb reset` starts a new container)",
                )
                log.warning("sandbox lost", extra={"sandbox": _name(sb)})
            return None
        old_agent, old_container = status.assigned_agent, status.container_id
        self.registry.give_up(old_agent, status.container_id)
        self.service.keys.pop(status.container_id, None)
        log.warning(
            "rescheduling after agent loss", extra={"sandbox": _name(sb), "agent": old_agent}
        )
        # Once per lost agent, not on every retry of a start that found no free slot.
        if set_condition(status, "Rescheduled", True, reason="AgentLost", message=old_agent):
            self.events.warning(
                sb, "AgentLost", f"{lost}; failurePolicy AutoRecreate: rescheduling"
            )
            self.events.record(
                sb,
                "Rescheduled",
                f"container {old_container} on agent {old_agent} given up; starting a new one "
                "on another agent",
            )
        return await self._restart(sb)

    async def _unassign(self, sb: Sandbox) -> None:
        """Forget the given-up container before starting a new one. If the start then finds no
        free slot, the record must not still point at the old agent: were that agent to come
        back, the sandbox would look Running there again without holding a slot."""
        status = sb.status
        if not status.assigned_agent and not status.container_id:
            return
        transition(status, P.PENDING, reason="Restarting")
        status.assigned_agent = ""
        status.agent_ip = ""
        status.container_id = ""
        status.endpoints = []
        await self._save(sb)

    async def _restart(self, sb: Sandbox) -> float | None:
        """Start a new container for an existing record (reschedule, reset)."""
        await self._unassign(sb)
        arrived = time.perf_counter()
        return await self._start_or_wait(sb, arrived, Timings(accepted_ms=0.0))

    async def _reset(self, sb: Sandbox) -> float | None:
        status = sb.status
        revision = f"spec.resetRevision {sb.spec.reset_revision}"
        old = status.container_id
        if status.assigned_agent and status.container_id:
            if self.service.unreachable_for(status.assigned_agent) is not None:
                self.events.warning(
                    sb,
                    "ResetPending",
                    f"{revision}: agent {status.assigned_agent} does not answer; the old "
                    "container must be gone first",
                )
                return 2.0  # the old container must be gone first
            agent = self.registry.agent(status.assigned_agent)
            await self.service.agents.get(agent.target).delete(
                status.container_id, self.service.grace_seconds
            )
            self.registry.release(agent.name, status.container_id)
            self.service.keys.pop(status.container_id, None)
        if not _retrying_start(sb):
            self.events.record(
                sb,
                "Reset",
                f"{revision}: container {old} deleted; starting a new one"
                if old
                else f"{revision}: starting a new container",
            )
        log.info("resetting", extra={"sandbox": _name(sb), "revision": sb.spec.reset_revision})
        return await self._restart(sb)

    # -- leases ------------------------------------------------------------------------------
    async def _lease_lapsed(self, sb: Sandbox) -> float | None:
        """The owner stopped renewing: delete the sandbox, as `fsb delete` would."""
        lapse = lease_lapses_at(sb)
        when = lapse.astimezone(UTC).isoformat().replace("+00:00", "Z") if lapse else "?"
        # Already in this sandbox's serial section: delete inline, not through service.delete.
        marked = await self.store.delete(Sandbox, sb.metadata.namespace, sb.metadata.name)
        log.info("lease lapsed; deleting", extra={"sandbox": _name(sb), "lapsed_at": when})
        if marked is None:
            self.service._forget(sb)
            return None
        if marked.status.phase is not P.TERMINATING:
            transition(marked.status, P.TERMINATING, reason="LeaseExpired")
            marked = await self.store.update_status(marked)
        self.events.warning(
            marked,
            "LeaseExpired",
            f"lease of {sb.spec.lease_seconds}s not renewed since it lapsed at {when}; deleting",
        )
        return await self.service.finalize(marked)

    # -- expiry ------------------------------------------------------------------------------
    async def _expire(self, sb: Sandbox) -> None:
        status = sb.status
        expire = sb.spec.expire_time
        deadline = expire.astimezone(UTC).isoformat().replace("+00:00", "Z") if expire else "?"
        what = f"past spec.expireTime ({deadline})"
        if status.assigned_agent and status.container_id:
            if self.service.unreachable_for(status.assigned_agent) is None:
                what += f": container {status.container_id} deleted"
                # An agent error propagates: the record stays as it is and the reconciler retries.
                agent = self.registry.agent(status.assigned_agent)
                await self.service.agents.get(agent.target).delete(
                    status.container_id, self.service.grace_seconds
                )
            else:
                what += (
                    f": container {status.container_id} left to the janitor (agent "
                    f"{status.assigned_agent} does not answer)"
                )
            # An unreachable agent's container has no record pointing at it any more: the
            # janitor removes it when (if) the agent comes back.
            self.registry.release(status.assigned_agent, status.container_id)
            self.service.keys.pop(status.container_id, None)
        transition(status, P.EXPIRED, reason="Expired")
        status.assigned_agent = ""
        status.agent_ip = ""
        status.container_id = ""
        status.endpoints = []
        set_condition(status, "Ready", False, reason="Expired", message="past spec.expireTime")
        await self._save(sb)
        self.events.record(sb, "Expired", what)
        log.info("sandbox expired", extra={"sandbox": _name(sb)})

    async def _collect_expired(self, sb: Sandbox) -> float | None:
        """Expired records stay for history, then go after the retention period."""
        expired_at = sb.spec.expire_time or now()
        left = (expired_at + timedelta(seconds=self.expired_retention) - now()).total_seconds()
        if left > 0:
            return left
        # Already in this sandbox's serial section: delete inline, not through service.delete.
        marked = await self.store.delete(Sandbox, sb.metadata.namespace, sb.metadata.name)
        if marked is not None:
            await self.service.finalize(marked)
        log.info("expired record collected", extra={"sandbox": _name(sb)})
        return None


def _retrying_start(sb: Sandbox) -> bool:
    """A start of this sandbox found no free slot and is being retried (its Reset or
    Rescheduled event was recorded by the first attempt)."""
    scheduled = condition(sb.status, "Scheduled")
    return scheduled is not None and scheduled.status == "False"


def _name(sb: Sandbox) -> str:
    return f"{sb.metadata.namespace}/{sb.metadata.name}"
