"""Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's leaderelection does it.

Every controller replica serves the Fast-Path, but only one may run reconcilers, pool scaling and
garbage collection: two would start agents twice and fight over the same records. The replica
holding the Lease `fastsandbox-controller` is that one.

- A candidate reads the Lease; when nobody holds it, the holder released it, or its record has not
  changed for `leaseDurationSeconds` *as measured on the candidate's own monotonic clock* (never
  by comparing the holder's `renewTime` with our wall clock: clocks skew), it writes itself in with
  the resourceVersion it read. The apiserver's optimistic concurrency makes exactly one candidate
  win; the others get a 409 and keep watching.
- The leader renews every `renew_interval` (duration / 3). A renew that has not succeeded for
  `renew_deadline` (2/3 of the duration) ends leadership *before* any candidate can take the Lease
  over (that needs a full duration without change), so two leaders never overlap as long as both
  clocks tick at the same rate.
- Leadership ends → the leading work is cancelled and `on_stopped_leading` runs; the elector
  then becomes a candidate again. A graceful stop releases the Lease (empty holder) so another
  replica takes over at its next try instead of after a full duration.

`LeaseApi` is the seam: `KubeLeaseApi` over lightkube, `MemoryLeaseApi` for unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from lightkube import AsyncClient
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

from fastsandbox._kube.errors import translate
from fastsandbox.errors import AlreadyExists, Conflict, FsbError, NotFound, Unavailable

log = logging.getLogger(__name__)

LEASE_NAME = "fastsandbox-controller"


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    holder: str
    duration_seconds: int
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    transitions: int = 0
    # Empty on a record not read from the API; a write carrying a stale one is a Conflict.
    resource_version: str = ""


class LeaseApi(Protocol):
    async def get(self) -> LeaseRecord | None:
        """The Lease, or None when it does not exist."""
        ...

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        """Create the Lease; `AlreadyExists` when someone else did first."""
        ...

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        """Replace the Lease if `record.resource_version` is current, else `Conflict`."""
        ...


class KubeLeaseApi:
    """`LeaseApi` on the apiserver (errors translated by `_kube.errors`, the one seam)."""

    def __init__(self, client: AsyncClient, namespace: str, name: str = LEASE_NAME) -> None:
        self._client = client
        self.namespace = namespace
        self.name = name
        self._what = f"Lease {namespace}/{name}"

    async def get(self) -> LeaseRecord | None:
        try:
            lease = await self._client.get(Lease, self.name, namespace=self.namespace)
        except Exception as exc:
            error = translate(exc, self._what)
            if isinstance(error, NotFound):
                return None
            raise error from None
        return _record(lease)

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        try:
            lease = await self._client.create(self._lease(record))
        except Exception as exc:
            raise translate(exc, self._what) from None
        return _record(lease)

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        try:
            lease = await self._client.replace(self._lease(record))
        except Exception as exc:
            raise translate(exc, self._what) from None
        return _record(lease)

    def _lease(self, record: LeaseRecord) -> Lease:
        return Lease(
            metadata=ObjectMeta(
                name=self.name,
                namespace=self.namespace,
                resourceVersion=record.resource_version or None,
            ),
            spec=LeaseSpec(
                holderIdentity=record.holder,
                leaseDurationSeconds=record.duration_seconds,
                acquireTime=record.acquire_time,
                renewTime=record.renew_time,
                leaseTransitions=record.transitions,
            ),
        )


def _record(lease: Lease) -> LeaseRecord:
    spec = lease.spec or LeaseSpec()
    return LeaseRecord(
        holder=spec.holderIdentity or "",
        duration_seconds=spec.leaseDurationSeconds or 0,
        acquire_time=spec.acquireTime,
        renew_time=spec.renewTime,
        transitions=spec.leaseTransitions or 0,
        resource_version=(lease.metadata.resourceVersion if lease.metadata else None) or "",
    )


class MemoryLeaseApi:
    """An in-memory Lease with the apiserver's concurrency rule, for unit tests.

    `fail` makes every call raise `Unavailable` (an unreachable apiserver, a partitioned replica).
    """

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.fail = False
        self._version = 0

    def _check(self) -> None:
        if self.fail:
            raise Unavailable("apiserver unreachable (test)")

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self._version += 1
        self.record = replace(record, resource_version=str(self._version))
        return self.record

    async def get(self) -> LeaseRecord | None:
        self._check()
        return self.record

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        self._check()
        if self.record is not None:
            raise AlreadyExists("lease exists")
        return self._store(record)

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        self._check()
        if self.record is None:
            raise NotFound("lease not found")
        if record.resource_version != self.record.resource_version:
            raise Conflict("lease changed")
        return self._store(record)


Callback = Callable[[], Coroutine[Any, Any, None]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class LeaderElector:
    def __init__(
        self,
        api: LeaseApi,
        identity: str,
        *,
        lease_duration: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _utcnow,
    ) -> None:
        if lease_duration < 1:
            raise ValueError("lease duration must be at least 1 second")
        self.api = api
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_interval = lease_duration / 3
        self.renew_deadline = lease_duration * 2 / 3
        self._clock = clock
        self._wall = wall
        # The last record we read or wrote, and when (our clock) it last changed.
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._renewed_at = 0.0
        self._leading = False

    @property
    def is_leader(self) -> bool:
        """True while we hold the Lease and our last renew is within the deadline."""
        return self._leading and self._clock() - self._renewed_at < self.renew_deadline

    @property
    def observed_holder(self) -> str:
        return self._observed.holder if self._observed is not None else ""

    def _observe(self, record: LeaseRecord) -> None:
        if self._observed is None or record.resource_version != self._observed.resource_version:
            self._observed = record
            self._observed_at = self._clock()

    async def try_acquire_or_renew(self) -> bool:
        """One attempt to become (or stay) the holder; True when we hold the Lease now."""
        stamp = self._wall()
        mine = LeaseRecord(
            holder=self.identity,
            duration_seconds=math.ceil(self.lease_duration),
            acquire_time=stamp,
            renew_time=stamp,
        )
        try:
            current = await self.api.get()
            if current is None:
                self._observe(await self.api.create(mine))
                return True
        except FsbError as exc:
            log.info("lease not acquired", extra={"identity": self.identity, "err": str(exc)})
            return False
        self._observe(current)
        other = current.holder not in ("", self.identity)
        if other and self._clock() < self._observed_at + current.duration_seconds:
            return False
        if current.holder == self.identity:
            wanted = replace(current, renew_time=stamp, duration_seconds=mine.duration_seconds)
        else:
            wanted = replace(
                mine,
                transitions=current.transitions + 1,
                resource_version=current.resource_version,
            )
        try:
            self._observe(await self.api.update(wanted))
        except FsbError as exc:
            # Conflict: someone else wrote first (a renew by the holder, or a rival candidate).
            log.info("lease not acquired", extra={"identity": self.identity, "err": str(exc)})
            return False
        if other or current.holder == "":
            log.info(
                "lease taken over",
                extra={"identity": self.identity, "previous": current.holder or "(released)"},
            )
        return True

    async def run(self, on_started_leading: Callback, on_stopped_leading: Callback) -> None:
        """Campaign, lead, and campaign again after losing, until cancelled.

        `on_started_leading` runs as a task while we lead and is cancelled when leadership ends;
        `on_stopped_leading` runs after it, every time. Cancelling `run` releases the Lease.
        """
        try:
            while True:
                await self._acquire()
                await self._lead(on_started_leading, on_stopped_leading)
                # Not straight back: a replica whose leading work crashed lets others try first.
                await asyncio.sleep(self.renew_interval)
        finally:
            await asyncio.shield(self._release())

    async def _acquire(self) -> None:
        while not await self.try_acquire_or_renew():
            # Jittered, so candidates that lost a race do not collide again in lockstep.
            await asyncio.sleep(self.renew_interval * random.uniform(1.0, 1.2))
        self._leading = True
        self._renewed_at = self._clock()
        log.info(
            "started leading",
            extra={"identity": self.identity, "transitions": self._observed_transitions()},
        )

    def _observed_transitions(self) -> int:
        return self._observed.transitions if self._observed is not None else 0

    async def _lead(self, on_started: Callback, on_stopped: Callback) -> None:
        work = asyncio.create_task(on_started(), name="leading")
        try:
            await self._renew_until_lost(work)
        finally:
            self._leading = False
            if not work.done():
                work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await work
                except Exception:
                    log.exception("leading work failed", extra={"identity": self.identity})
            try:
                await asyncio.shield(on_stopped())
            except Exception:
                log.exception("stop-leading callback failed", extra={"identity": self.identity})

    async def _renew_until_lost(self, work: asyncio.Task[None]) -> None:
        while True:
            await asyncio.sleep(self.renew_interval)
            if work.done() and not work.cancelled() and work.exception() is not None:
                # The leading work crashed: hand the Lease to a replica that may do better.
                log.error("leading work crashed; stepping down", extra={"identity": self.identity})
                await self._release()
                return
            left = self.renew_deadline - (self._clock() - self._renewed_at)
            try:
                async with asyncio.timeout(max(left, 0.001)):
                    renewed = await self.try_acquire_or_renew()
            except TimeoutError:
                renewed = False
            if renewed:
                self._renewed_at = self._clock()
                continue
            if self.observed_holder not in ("", self.identity):
                log.warning(
                    "lease held by another replica; stopped leading",
                    extra={"identity": self.identity, "holder": self.observed_holder},
                )
                return
            if self._clock() - self._renewed_at >= self.renew_deadline:
                log.warning(
                    "lease not renewed within the deadline; stopped leading",
                    extra={"identity": self.identity, "deadline_s": self.renew_deadline},
                )
                return

    async def _release(self) -> None:
        """Give the Lease up (empty holder), so a candidate takes it at its next try."""
        observed = self._observed
        self._leading = False
        if observed is None or observed.holder != self.identity:
            return
        stamp = self._wall()
        try:
            async with asyncio.timeout(max(self.renew_interval, 1.0)):
                self._observe(
                    await self.api.update(
                        replace(observed, holder="", duration_seconds=1, renew_time=stamp)
                    )
                )
        except (FsbError, TimeoutError) as exc:
            log.info("lease not released", extra={"identity": self.identity, "err": str(exc)})
            return
        log.info("lease released", extra={"identity": self.identity})
