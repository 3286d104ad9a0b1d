"""How long a leader takeover takes when the Lease holder stops answering (a kill -9, a partition),
on the in-memory Lease (the baseline: the election's own waiting) and on a real
coordination.k8s.io/v1 Lease (etcd + kube-apiserver), in one run.

    .venv/bin/python benchmarks/leader_failover.py [-n 20] [--lease 3] [--no-kube]

These are the numbers tests/unit/test_leader_election.py, tests/integration/test_kube_lease.py and
tests/e2e/test_kube_controller.py used to assert; the tests now check only the order (the
follower leads after the leader stopped, and a whole lease duration after its last renewal).

Each sample is one pair of electors (`LeaderElector`, lease `--lease` s): `a` leads, `b` waits;
then every call of `a` to the Lease API hangs forever, as a SIGKILLed process's would. Pairs run
in batches of 5 at once (each on its own Lease). Series, in seconds, p50/p95/p99 by nearest rank:

  takeover after cut       a's Lease API stops answering → b's on_started_leading is called
  takeover after renewal   a's last successful renewal was *sent* → b's on_started_leading;
                           at least the lease duration by the protocol, plus up to one
                           renew interval (duration/3, +20 % jitter) of b's polling
  step-down after cut      a's Lease API stops answering → a's on_stopped_leading (its renew
                           deadline, 2/3 of the duration): always before b leads

and, with real `fsb controller` processes (two replicas on the same kube-apiserver, no agents;
`--controllers 0` leaves it out):

  controller kill -9       SIGKILL of the replica holding the Lease → the other replica is the
                           Lease's holder (polled every 100 ms through the apiserver); the
                           killed replica is restarted, as a follower, before the next sample

The kube series need the kube-apiserver binaries (scripts/build-kube-apiserver, cached in
~/.cache/fastsandbox/); the controller series also needs root (the process kubelet's containerd).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastsandbox._kube.lease import (  # noqa: E402
    KubeLeaseApi,
    LeaderElector,
    LeaseApi,
    LeaseRecord,
    MemoryLeaseApi,
)

BATCH = 5
SERIES = ("takeover after cut", "takeover after renewal", "step-down after cut")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def row(name: str, values: list[float]) -> str:
    return (
        f"{name:<48} n={len(values):<4} p50={pct(values, 50):6.2f}  p95={pct(values, 95):6.2f}"
        f"  p99={pct(values, 99):6.2f}  mean={statistics.fmean(values):6.2f}  s"
    )


class CutOff:
    """A LeaseApi that stops answering on demand and remembers its last successful write."""

    def __init__(self, api: LeaseApi) -> None:
        self.api = api
        self.dead = False
        self.last_write = 0.0

    async def _gate(self) -> None:
        if self.dead:
            await asyncio.Event().wait()

    async def get(self) -> LeaseRecord | None:
        await self._gate()
        return await self.api.get()

    async def _write(
        self, write: Callable[[LeaseRecord], Awaitable[LeaseRecord]], record: LeaseRecord
    ) -> LeaseRecord:
        await self._gate()
        sent = asyncio.get_running_loop().time()
        written = await write(record)
        self.last_write = sent
        return written

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        return await self._write(self.api.create, record)

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        return await self._write(self.api.update, record)


@dataclass
class Probe:
    started: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    stopped_at: float = 0.0

    async def lead(self) -> None:
        self.started_at = asyncio.get_running_loop().time()
        self.started.set()
        await asyncio.Event().wait()

    async def stop(self) -> None:
        self.stopped_at = asyncio.get_running_loop().time()
        self.stopped.set()


async def one_takeover(a_api: LeaseApi, b_api: LeaseApi, lease: int) -> dict[str, float]:
    cut_api = CutOff(a_api)
    a = LeaderElector(cut_api, "a", lease_duration=lease)
    b = LeaderElector(b_api, "b", lease_duration=lease)
    pa, pb = Probe(), Probe()
    ta = asyncio.create_task(a.run(pa.lead, pa.stop))
    tb: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(pa.started.wait(), 60)
        tb = asyncio.create_task(b.run(pb.lead, pb.stop))
        await asyncio.sleep(lease * 1.5)  # b has observed a renewing
        loop = asyncio.get_running_loop()
        cut_api.dead = True
        cut = loop.time()
        await asyncio.wait_for(pb.started.wait(), lease * 20)
        await asyncio.wait_for(pa.stopped.wait(), lease * 20)
        return {
            "takeover after cut": pb.started_at - cut,
            "takeover after renewal": pb.started_at - cut_api.last_write,
            "step-down after cut": pa.stopped_at - cut,
        }
    finally:
        tasks = [t for t in (ta, tb) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def series(
    make: Callable[[int], Awaitable[tuple[LeaseApi, LeaseApi]]], n: int, lease: int
) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {name: [] for name in SERIES}
    done = 0
    while done < n:
        size = min(BATCH, n - done)
        pairs = [await make(done + i) for i in range(size)]
        for sample in await asyncio.gather(*(one_takeover(a, b, lease) for a, b in pairs)):
            for name, value in sample.items():
                found[name].append(value)
        done += size
    return found


async def memory_series(n: int, lease: int) -> dict[str, list[float]]:
    async def make(_i: int) -> tuple[LeaseApi, LeaseApi]:
        api = MemoryLeaseApi()
        return api, api

    return await series(make, n, lease)


async def kube_series(n: int, lease: int) -> dict[str, list[float]]:
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace

    from fastsandbox._kube.config import make_client
    from tests.k8s_infra import start_kube_apiserver

    with tempfile.TemporaryDirectory(prefix="fsb-bench-lease-") as tmp:
        api = await asyncio.to_thread(start_kube_apiserver, Path(tmp))
        try:
            # Two clients: each replica has its own connection, as two processes would.
            client_a = await make_client(api.kubeconfig)
            client_b = await make_client(api.kubeconfig)
            try:
                await client_a.create(Namespace(metadata=ObjectMeta(name="bench")))

                async def make(i: int) -> tuple[LeaseApi, LeaseApi]:
                    name = f"bench-{i}"
                    return KubeLeaseApi(client_a, "bench", name), KubeLeaseApi(
                        client_b, "bench", name
                    )

                return await series(make, n, lease)
            finally:
                await client_a.close()
                await client_b.close()
        finally:
            api.stop()


def controller_series(n: int, lease: int) -> list[float]:
    import contextlib
    import functools
    import operator
    import os
    import signal
    import time

    from lightkube import Client, KubeConfig

    from tests.e2e._kube_server import new_kube_server, purge_kube
    from tests.infra import missing_requirements, remove_cgroup, start_containerd
    from tests.k8s_fixtures import install_crds
    from tests.k8s_infra import start_kube_apiserver

    why = missing_requirements()
    if why:
        print(f"controller kill -9 series left out: {why}", file=sys.stderr)
        return []
    cgroup = f"/fsb-bench-failover-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="fsb-bench-ctl-", dir="/tmp") as tmp:
        api = start_kube_apiserver(Path(tmp))
        containerd = None
        server = None
        try:
            with contextlib.closing(Client(KubeConfig.from_file(api.kubeconfig))) as client:
                install_crds(client)
            containerd = start_containerd(Path(tmp))
            server = new_kube_server(
                api.kubeconfig,
                containerd.socket,
                "127.0.0.1:5000",  # no agents run: nothing is pulled
                cgroup,
                replicas=2,
                lease_duration=lease,
                default_pool=False,
            )
            server.start()
            found: list[float] = []
            for _ in range(n):
                leader = server.wait_leader(timeout=120)
                time.sleep(lease * 1.5)  # the follower has seen the holder renew
                killed = time.monotonic()
                server.stop_replica(leader, signal.SIGKILL)
                server.wait_leader(functools.partial(operator.ne, leader), timeout=lease * 20)
                found.append(time.monotonic() - killed)
                server.start_replica(leader)
            return found
        finally:
            if server is not None:
                purge_kube(server)
            if containerd is not None:
                containerd.stop()
            api.stop()
            remove_cgroup(cgroup)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="takeovers per series")
    parser.add_argument("--lease", type=int, default=3, help="lease duration, seconds")
    parser.add_argument("--no-kube", action="store_true", help="only the in-memory baseline")
    parser.add_argument(
        "--controllers", type=int, default=10, help="kill -9 samples of real fsb controllers"
    )
    args = parser.parse_args()
    # The electors log every step-down; the table is the output.
    logging.getLogger("fastsandbox").setLevel(logging.ERROR)

    results = {"memory Lease (baseline)": asyncio.run(memory_series(args.n, args.lease))}
    killed: list[float] = []
    if not args.no_kube:
        results["kube-apiserver Lease"] = asyncio.run(kube_series(args.n, args.lease))
        if args.controllers:
            killed = controller_series(args.controllers, args.lease)
    renew = args.lease / 3
    print(
        f"leader takeover, lease {args.lease} s (renew interval {renew:.2f} s, renew deadline "
        f"{args.lease * 2 / 3:.2f} s), {args.n} takeovers per series, {BATCH} at a time"
    )
    for where, found in results.items():
        for name in SERIES:
            print(row(f"{where}: {name}", found[name]))
    if killed:
        print(row("fsb controller: kill -9 → other replica holds", killed))
    print("boundaries: see the docstring of benchmarks/leader_failover.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
