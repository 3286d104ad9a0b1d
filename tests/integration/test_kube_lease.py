"""Leader election on a real coordination.k8s.io/v1 Lease (real etcd + kube-apiserver): two
electors, one wins; the winner is cut off without releasing (as a kill -9 does), and the other
takes the Lease only after the winner stopped renewing and a whole lease duration passed since its
last renewal; a graceful stop hands it over at once. How long a takeover takes is printed by
`benchmarks/leader_failover.py`, not asserted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from lightkube import AsyncClient
from lightkube.resources.coordination_v1 import Lease

from fastsandbox._kube.config import make_client
from fastsandbox._kube.lease import KubeLeaseApi, LeaderElector, LeaseRecord
from fastsandbox.errors import AlreadyExists, Conflict

pytestmark = [pytest.mark.kubernetes, pytest.mark.integration]

DURATION = 3
LIVENESS_SECONDS = 60.0  # generous: the apiserver shares 2 cores with the rest of the suite


@pytest.fixture
async def kube(kube_apiserver: Any, kube_crds: Any) -> AsyncIterator[AsyncClient]:
    client = await make_client(kube_apiserver.kubeconfig)
    try:
        yield client
    finally:
        await client.close()


class Probe:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()
        self.started_at = 0.0

    async def lead(self) -> None:
        self.started_at = asyncio.get_running_loop().time()
        self.started.set()
        await asyncio.Event().wait()

    async def stop(self) -> None:
        self.stopped.set()


class CutOff:
    """A LeaseApi that stops answering on demand: the replica's process is frozen or dead."""

    def __init__(self, api: KubeLeaseApi) -> None:
        self.api = api
        self.dead = False
        self.last_write = 0.0  # when the last write that then succeeded was sent

    async def _gate(self) -> None:
        if self.dead:
            await asyncio.Event().wait()  # never answers, like a SIGKILLed process

    async def get(self) -> LeaseRecord | None:
        await self._gate()
        return await self.api.get()

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        await self._gate()
        sent = asyncio.get_running_loop().time()
        written = await self.api.create(record)
        self.last_write = sent
        return written

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        await self._gate()
        sent = asyncio.get_running_loop().time()
        written = await self.api.update(record)
        self.last_write = sent
        return written


async def test_one_wins_and_the_other_takes_over_after_the_lease(
    kube: AsyncClient, kube_namespace: str
) -> None:
    ns = kube_namespace
    a_api = CutOff(KubeLeaseApi(kube, ns, "election"))
    a = LeaderElector(a_api, "replica-a", lease_duration=DURATION)
    b = LeaderElector(KubeLeaseApi(kube, ns, "election"), "replica-b", lease_duration=DURATION)
    pa, pb = Probe(), Probe()
    ta = asyncio.create_task(a.run(pa.lead, pa.stop))
    await asyncio.wait_for(pa.started.wait(), LIVENESS_SECONDS)
    tb = asyncio.create_task(b.run(pb.lead, pb.stop))
    loop = asyncio.get_running_loop()
    try:
        await asyncio.sleep(DURATION * 1.5)
        assert not pb.started.is_set(), "two leaders at once"
        lease = await kube.get(Lease, "election", namespace=ns)
        assert lease.spec is not None
        assert lease.spec.holderIdentity == "replica-a"
        assert lease.spec.leaseDurationSeconds == DURATION
        assert lease.spec.leaseTransitions == 0
        assert lease.spec.renewTime is not None and lease.spec.acquireTime is not None
        assert lease.spec.renewTime > lease.spec.acquireTime  # renewed meanwhile

        a_api.dead = True
        cut = loop.time()
        await asyncio.wait_for(pb.started.wait(), LIVENESS_SECONDS)
        await asyncio.wait_for(pa.stopped.wait(), LIVENESS_SECONDS)
        # b measures the lease from the last change it observed, which came after a sent its
        # last renewal: so b leads only a whole lease duration after that renewal was sent.
        assert a_api.last_write <= cut < pb.started_at
        assert pb.started_at >= a_api.last_write + DURATION
        lease = await kube.get(Lease, "election", namespace=ns)
        assert lease.spec is not None
        assert lease.spec.holderIdentity == "replica-b"
        assert lease.spec.leaseTransitions == 1
    finally:
        for task in (ta, tb):
            task.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)


async def test_a_graceful_stop_hands_over_at_once(kube: AsyncClient, kube_namespace: str) -> None:
    ns = kube_namespace
    a_api = CutOff(KubeLeaseApi(kube, ns, "handover"))
    a = LeaderElector(a_api, "replica-a", lease_duration=15)
    b = LeaderElector(KubeLeaseApi(kube, ns, "handover"), "replica-b", lease_duration=15)
    pa, pb = Probe(), Probe()
    ta = asyncio.create_task(a.run(pa.lead, pa.stop))
    await asyncio.wait_for(pa.started.wait(), LIVENESS_SECONDS)
    tb = asyncio.create_task(b.run(pb.lead, pb.stop))
    try:
        await asyncio.sleep(0.5)
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)
        assert pa.stopped.is_set()
        await asyncio.wait_for(pb.started.wait(), LIVENESS_SECONDS)
        # Taken before a's lease could have run out (b retries every 5 s): only the release
        # (a's last write) explains it.
        assert pb.started_at < a_api.last_write + 15
        lease = await kube.get(Lease, "handover", namespace=ns)
        assert lease.spec is not None and lease.spec.holderIdentity == "replica-b"
    finally:
        tb.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)


async def test_a_stale_write_is_a_conflict(kube: AsyncClient, kube_namespace: str) -> None:
    api = KubeLeaseApi(kube, kube_namespace, "cas")
    assert await api.get() is None
    first = await api.create(LeaseRecord(holder="x", duration_seconds=5))
    assert first.resource_version
    second = await api.update(
        LeaseRecord(holder="y", duration_seconds=5, resource_version=first.resource_version)
    )

    with pytest.raises(Conflict):
        await api.update(
            LeaseRecord(holder="z", duration_seconds=5, resource_version=first.resource_version)
        )
    with pytest.raises(AlreadyExists):
        await api.create(LeaseRecord(holder="z", duration_seconds=5))
    got = await api.get()
    assert got is not None and got.holder == "y" and got.resource_version == second.resource_version
