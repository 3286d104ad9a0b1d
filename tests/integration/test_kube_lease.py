"""Leader election on a real coordination.k8s.io/v1 Lease (real etcd + kube-apiserver): two
electors, one wins; the winner is cut off without releasing (as a kill -9 does), the other takes
the Lease within lease duration + one renew interval; a graceful stop hands it over at once."""

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

    async def lead(self) -> None:
        self.started.set()
        await asyncio.Event().wait()

    async def stop(self) -> None:
        self.stopped.set()


class CutOff:
    """A LeaseApi that stops answering on demand: the replica's process is frozen or dead."""

    def __init__(self, api: KubeLeaseApi) -> None:
        self.api = api
        self.dead = False

    async def _gate(self) -> None:
        if self.dead:
            await asyncio.Event().wait()  # never answers, like a SIGKILLed process

    async def get(self) -> LeaseRecord | None:
        await self._gate()
        return await self.api.get()

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        await self._gate()
        return await self.api.create(record)

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        await self._gate()
        return await self.api.update(record)


async def test_one_wins_and_the_other_takes_over_after_the_lease(
    kube: AsyncClient, kube_namespace: str
) -> None:
    ns = kube_namespace
    a_api = CutOff(KubeLeaseApi(kube, ns, "election"))
    a = LeaderElector(a_api, "replica-a", lease_duration=DURATION)
    b = LeaderElector(KubeLeaseApi(kube, ns, "election"), "replica-b", lease_duration=DURATION)
    pa, pb = Probe(), Probe()
    ta = asyncio.create_task(a.run(pa.lead, pa.stop))
    await asyncio.wait_for(pa.started.wait(), 10)
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
        await asyncio.wait_for(pb.started.wait(), DURATION * 3)
        took = loop.time() - cut
        await asyncio.wait_for(pa.stopped.wait(), DURATION)
        # b measured the lease from its last observed change; that is at most one renew
        # interval before the cut, and b looks again every renew interval (+20 % jitter).
        assert took <= DURATION + b.renew_interval * 1.2 + 1.0, took
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
    a = LeaderElector(KubeLeaseApi(kube, ns, "handover"), "replica-a", lease_duration=15)
    b = LeaderElector(KubeLeaseApi(kube, ns, "handover"), "replica-b", lease_duration=15)
    pa, pb = Probe(), Probe()
    ta = asyncio.create_task(a.run(pa.lead, pa.stop))
    await asyncio.wait_for(pa.started.wait(), 10)
    tb = asyncio.create_task(b.run(pb.lead, pb.stop))
    try:
        await asyncio.sleep(0.5)
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)
        assert pa.stopped.is_set()
        # b retries every 5 s (+ jitter): far less than the 15 s lease.
        await asyncio.wait_for(pb.started.wait(), 5 * 1.2 + 1)
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
