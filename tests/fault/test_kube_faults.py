"""The fault scenarios of issue 12 on the Kubernetes shape: two `fsb controller` replicas behind
the Lease on the session's real etcd + kube-apiserver, agents as Pods of the process kubelet,
each replica reaching the apiserver through a gate of its own (tests/fault/_kube.py) that can
cut it off.

- **kube-apiserver restart under load** (`FSB_FAULT_ROUNDS` rounds): creates, execs and deletes
  through both replicas while the apiserver is killed and started again on the same port, etcd
  and certificates. Checked: calls during the outage fail with UNAVAILABLE and a message (no
  other kind, no hang); the replicas resume by themselves (full create/exec/delete cycles again,
  a Sandbox written to the apiserver afterwards converges); every acknowledged create is there
  and Running, no acknowledged delete comes back; never two leaders at once; the leak check.
- **the leader cut off from the apiserver** (a partition longer than the Lease): the leader
  notices (its renew fails, it stops leading within the renew deadline), the other replica takes
  the Lease and reconciles, the Fast-Path of the cut-off replica ends calls with UNAVAILABLE
  instead of hanging, and once the partition heals the replica serves again as a follower.
  Never two leaders at once (both replicas' logs); the leak check.
- **a Fast create answered, then its replica killed -9 before the record is written**: the
  follower's gate to the apiserver is cut before the create, so its record write after the
  reply is held there; the replica is killed -9 and what it had sent is dropped. Checked: no
  record exists after the kill (so the case really is "answered, not stored"), and once the
  replica is started again its recovery rebuilds the record from the container's request label:
  the same container, Running, exec works; the leak check.
- **admission with two replicas**: `FSB_FAULT_CREATES` concurrent creates (100; `make fault`:
  500) spread over both replicas against `FSB_FAULT_CAPACITY` slots (10; 50): exactly that many
  admitted, the rest RESOURCE_EXHAUSTED; no agent over its slots, no container claimed twice;
  then 40 creates exposing one port on two agents of a shared network: exactly one owner per
  agent.

Each prints what it checked (`-s`). Nothing is timed; durations are printed only.
Run: `flock /tmp/fsb-infra.lock .venv/bin/pytest -q -s tests/fault/test_kube_faults.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from fastsandbox._kube.resources import SandboxResource
from fastsandbox.errors import CapacityExhausted, FsbError, NotFound
from fastsandbox.sdk import AsyncClient
from fastsandbox.sdk.commands import AsyncCommands
from tests.e2e._kube_server import NAMESPACE, KubeServer, new_kube_server, purge_kube
from tests.fault._kube import (
    Gate,
    gated_kubeconfig,
    kube_inventory,
    leading_intervals,
    log_stamp,
    overlaps,
)
from tests.fault._leaks import Inventory, leaks
from tests.fault.conftest import ROUNDS, drop_pool, make_pool, report, until
from tests.k8s_infra import KubeApiserverProc

pytestmark = [pytest.mark.e2e, pytest.mark.kubernetes]

CREATES = int(os.environ.get("FSB_FAULT_CREATES", "100"))
CAPACITY = int(os.environ.get("FSB_FAULT_CAPACITY", "10"))
LEASE_SECONDS = 4
SLEEP = ["sleep", "3600"]
BOUND = 120.0  # liveness bound for recoveries on 2 shared cores; nothing is timed


@dataclass
class Kube:
    server: KubeServer
    api: KubeApiserverProc
    gates: list[Gate]
    baseline: Inventory | None = None

    def client(self, replica: int) -> AsyncClient:
        return AsyncClient(
            self.server.replicas[replica].endpoint,
            self.server.token,
            NAMESPACE,
            ca_file=self.server.ca_file,
            timeout=120,
        )


@pytest.fixture(scope="module")
def kube(request: pytest.FixtureRequest) -> Iterator[Kube]:
    api: KubeApiserverProc = request.getfixturevalue("kube_crds")
    containerd = request.getfixturevalue("containerd")
    srv = new_kube_server(
        api.kubeconfig,
        containerd.socket,
        request.getfixturevalue("registry_addr"),
        request.getfixturevalue("cgroup_parent"),
        replicas=2,
        lease_duration=LEASE_SECONDS,
    )
    port = int(api.url.rsplit(":", 1)[1])
    gates = [Gate(port) for _ in srv.replicas]
    try:
        for i, replica in enumerate(srv.replicas):
            replica.kubeconfig = gated_kubeconfig(
                api.kubeconfig, gates[i].start(), srv.work_dir / f"kubeconfig-{i}"
            )
        srv.start()
        yield Kube(srv, api, gates)
    finally:
        for gate in gates:
            gate.heal()
        purge_kube(srv)
        for gate in gates:
            gate.stop()


def settled(kube: Kube, pools: tuple[str, ...]) -> tuple[Inventory, dict[str, list[str]]]:
    """The leak check once the system had time to converge; the last result at 60 s."""
    deadline = time.monotonic() + 60
    while True:
        inv = kube_inventory(kube.server, pools, kube.baseline)
        found = leaks(inv)
        if not found or time.monotonic() > deadline:
            return inv, found
        time.sleep(0.5)


def no_two_leaders(kube: Kube) -> int:
    intervals = leading_intervals(kube.server)
    both = overlaps(intervals)
    assert not both, f"two replicas led at once: {both}"
    return len(intervals)


def exists(server: KubeServer, name: str, replica: int = 0) -> bool:
    got = server.fsb("get", name, env=server.env_for(replica))
    assert got.returncode in (0, 3), got.stderr
    return got.returncode == 0


def phase(server: KubeServer, name: str, replica: int = 0) -> str:
    got = server.fsb("get", name, "-o", "json", env=server.env_for(replica))
    if got.returncode != 0:
        return ""
    value: str = json.loads(got.stdout)["status"].get("phase", "")
    return value


def apply_sandbox(server: KubeServer, name: str, image: str, pool: str) -> None:
    """What `kubectl apply` does: the object goes to the apiserver, not to a Fast-Path."""
    body = {
        "apiVersion": "fastsandbox.io/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"poolRef": pool, "image": image, "command": SLEEP},
    }
    with contextlib.closing(server.admin()) as client:
        client.create(SandboxResource.from_dict(body))


async def delete_all(kube: Kube, names: set[str]) -> None:
    async with kube.client(0) as client:

        async def one(name: str) -> None:
            with contextlib.suppress(NotFound):
                await client.delete(name, wait=True)

        await asyncio.gather(*(one(n) for n in sorted(names)))


# -- 1. kube-apiserver restart under load ------------------------------------------------------


class Storm:
    """Workers creating, exec'ing in and deleting sandboxes through both replicas until told to
    stop; what was acknowledged, and every error with its message."""

    def __init__(self, kube: Kube, image: str, pool: str, round_no: int) -> None:
        self.kube = kube
        self.image = image
        self.pool = pool
        self.round_no = round_no
        self.acked: set[str] = set()
        self.deleted: set[str] = set()
        self.unsure: set[str] = set()  # creates and deletes whose reply was an error
        self.cycles = 0
        self.execs = 0
        self.errors: Counter[str] = Counter()
        self.messages: list[str] = []
        self.stop = asyncio.Event()

    async def worker(self, client: AsyncClient, w: int) -> None:
        # Each worker execs in and deletes only what it made: two workers deleting one sandbox
        # would see NotFound / FailedPrecondition of each other's doing, not the fault's.
        rng = random.Random(self.round_no * 100 + w)
        mine: list[str] = []
        k = 0
        while not self.stop.is_set():
            name = f"r{self.round_no}-{w}-{k}"
            k += 1
            step, victim = "create", ""
            try:
                await client.create(name, self.image, pool=self.pool, command=SLEEP)
                self.acked.add(name)
                mine.append(name)
                step = "exec"
                target = rng.choice(mine)
                got = await AsyncCommands(client, NAMESPACE, target).run(["echo", name], timeout=30)
                assert got.stdout == f"{name}\n"
                self.execs += 1
                step = "delete"
                victim = mine.pop(rng.randrange(len(mine)))
                await client.delete(victim)
                self.deleted.add(victim)
                self.cycles += 1
            except FsbError as exc:
                self.errors[f"{step}: {type(exc).__name__}"] += 1
                self.messages.append(f"{step}: {type(exc).__name__}: {exc.message}")
                if step == "create":
                    self.unsure.add(name)
                elif step == "delete":
                    self.unsure.add(victim)  # may or may not be deleted: not used again
                await asyncio.sleep(0.3)


async def _storm_round(kube: Kube, storm: Storm, workers: int) -> float:
    clients = [kube.client(0), kube.client(1)]
    try:
        tasks = [asyncio.create_task(storm.worker(clients[w % 2], w)) for w in range(workers)]
        while storm.cycles < 4:  # under way on both replicas first
            await asyncio.sleep(0.2)
        outage = await asyncio.to_thread(kube.api.restart_apiserver)
        restarted = time.monotonic()
        at_restart = storm.cycles
        # Resumed by itself: full cycles again (two per worker, so every one got through).
        while storm.cycles < at_restart + 2 * workers:
            assert time.monotonic() - restarted < BOUND, storm.messages[-5:]
            await asyncio.sleep(0.2)
        storm.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), BOUND)
    finally:
        for client in clients:
            await client.close()
    return outage


def test_apiserver_restart_under_load(kube: Kube, demo_image: str) -> None:
    server = kube.server
    pool = "krestart"
    kube.baseline = kube.baseline or kube_inventory(server, ())
    make_pool(server, pool, agents=2, per_agent=12, network_mode="shared")
    totals: Counter[str] = Counter()
    try:
        for r in range(ROUNDS):
            storm = Storm(kube, demo_image, pool, r)
            outage = asyncio.run(_storm_round(kube, storm, workers=4))
            # Every failure during the outage is UNAVAILABLE with a message naming the cause.
            kinds = {k.split(": ")[1] for k in storm.errors}
            assert kinds <= {"Unavailable"}, "\n".join(storm.messages)
            assert all(m.split(": ", 2)[2].strip() for m in storm.messages)
            kept = storm.acked - storm.deleted - storm.unsure
            for name in sorted(kept):
                until(
                    f"acknowledged {name} Running", lambda n=name: phase(server, n) == "Running", 60
                )
            for name in sorted(storm.deleted):
                until(f"deleted {name} gone", lambda n=name: not exists(server, n), 60)
            # The leader's watches resumed: a Sandbox written straight to the apiserver now
            # converges (only the leader reconciles).
            after = f"after-restart-{r}"
            apply_sandbox(server, after, demo_image, pool)
            until(f"{after} Running", lambda n=after: phase(server, n) == "Running", 60)
            leader = server.wait_leader()
            for replica in (0, 1):  # both replicas' views caught up
                assert phase(server, after, replica) == "Running"
            inv, found = settled(kube, (pool,))
            report(
                f"kube-apiserver restart round {r + 1}/{ROUNDS}", inv, found,
                apiserver_down_s=round(outage, 2), acked_creates=len(storm.acked),
                acked_deletes=len(storm.deleted), execs=storm.execs, cycles=storm.cycles,
                errors=dict(storm.errors), leader=leader,
                sample=repr(storm.messages[0][:140]) if storm.messages else "-",
            )  # fmt: skip
            for name in sorted(storm.deleted):  # converged: still gone (no resurrection)
                assert not exists(server, name), f"deleted {name} came back"
            totals.update(
                acked_creates=len(storm.acked), acked_deletes=len(storm.deleted),
                execs=storm.execs, errors=sum(storm.errors.values()),
            )  # fmt: skip
            present = {
                i["metadata"]["name"]
                for i in server.fsb_json("list")["items"]
                if i["spec"].get("poolRef") == pool
            }
            asyncio.run(delete_all(kube, present))
        leads = no_two_leaders(kube)
        inv, found = settled(kube, (pool,))
        report("kube-apiserver restart total", inv, found, rounds=ROUNDS, terms=leads, **totals)
    finally:
        drop_pool(server, pool)


# -- 2. the leader cut off from the apiserver --------------------------------------------------


def _log_events(kube: Kube, replica: int, since: float) -> list[str]:
    """The messages a replica logged from unix time `since` on."""
    path = kube.server.replicas[replica].log
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError):
            entry = json.loads(line)
            if log_stamp(entry["timestamp"]) >= since:
                out.append(str(entry.get("event", "")))
    return out


def _cut_round(kube: Kube, demo_image: str, pool: str, r: int, made: set[str]) -> None:
    server = kube.server
    leader = server.wait_leader()
    other = 1 - leader
    transitions = server.lease().spec.leaseTransitions or 0  # type: ignore[union-attr]
    before = f"before-cut-{r}"
    ran = server.fsb("run", before, "--image", demo_image, "--pool", pool, "--", *SLEEP)
    assert ran.returncode == 0, ran.stderr
    made.add(before)

    kube.gates[leader].cut()
    cut_at, cut_wall = time.monotonic(), time.time()
    # The cut-off replica's Fast-Path ends a call that needs the apiserver with an
    # error (not a hang) while the partition lasts.
    answer: dict[str, Any] = {}

    def ask() -> None:
        started = time.monotonic()
        got = server.fsb("get", "no-such-sandbox", env=server.env_for(leader))
        answer.update(code=got.returncode, err=got.stderr, s=time.monotonic() - started)

    asking = threading.Thread(target=ask)
    asking.start()
    taken = server.wait_leader(lambda i: i == other, timeout=BOUND)
    took_s = time.monotonic() - cut_at
    lease = server.lease().spec
    assert lease is not None and lease.leaseTransitions == transitions + 1
    # The new leader reconciles while the old one is cut off.
    during = f"during-cut-{r}"
    apply_sandbox(server, during, demo_image, pool)
    made.add(during)
    until(f"{during} Running", lambda: phase(server, during, other) == "Running", 60)
    # The other replica's Fast-Path serves throughout.
    fast = f"fast-cut-{r}"
    ran = server.fsb(
        "run", fast, "--image", demo_image, "--pool", pool, "--", *SLEEP,
        env=server.env_for(other),
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    made.add(fast)
    got = server.fsb("exec", fast, "--", "echo", "ok", env=server.env_for(other))
    assert got.returncode == 0 and got.stdout == "ok\n", got.stderr
    # The old leader noticed on its own (no apiserver told it): it stopped leading, and its
    # loops ended (they wait on requests that cannot get through, which time out).
    said = _log_events(kube, leader, cut_wall)
    assert any("stopped leading" in e for e in said), said[-20:]
    until(
        "the cut-off leader's loops ended",
        lambda: any(e.startswith("following:") for e in _log_events(kube, leader, cut_wall)),
        BOUND,
    )
    loops_ended_s = time.monotonic() - cut_at
    # Longer than the Lease and the request timeouts, so every watch and renew has
    # given up or is stuck on the cut connection.
    while time.monotonic() - cut_at < 3 * LEASE_SECONDS + 12:
        time.sleep(0.5)
    asking.join(BOUND)
    assert not asking.is_alive(), "a Fast-Path call on the cut-off replica hung"
    assert answer["code"] == 7, answer  # UNAVAILABLE
    assert "apiserver" in answer["err"], answer

    kube.gates[leader].heal()
    healed = time.monotonic()
    # Back as a follower: its view catches up and its Fast-Path works again.
    until(
        "the healed replica sees what the new leader did",
        lambda: phase(server, during, leader) == "Running",
        BOUND,
    )
    back = f"after-cut-{r}"
    ran = server.fsb(
        "run", back, "--image", demo_image, "--pool", pool, "--", *SLEEP,
        env=server.env_for(leader),
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    made.add(back)
    got = server.fsb("exec", back, "--", "echo", "ok", env=server.env_for(leader))
    assert got.returncode == 0 and got.stdout == "ok\n", got.stderr
    resumed_s = time.monotonic() - healed
    assert server.leader() == taken
    for name in (before, during, fast, back):
        assert phase(server, name) == "Running", name
    leads = no_two_leaders(kube)
    inv, found = settled(kube, (pool,))
    report(
        f"leader cut off round {r + 1}/{ROUNDS}", inv, found,
        old_leader=leader, new_leader=taken, takeover_s=round(took_s, 2),
        cut_s=round(healed - cut_at, 1), fastpath_error_after_s=round(answer["s"], 1),
        resumed_s=round(resumed_s, 1), loops_ended_within_s=round(loops_ended_s, 1), terms=leads,
    )  # fmt: skip
    asyncio.run(delete_all(kube, set(made)))
    made.clear()


def test_a_leader_cut_off_from_the_apiserver_steps_down(kube: Kube, demo_image: str) -> None:
    server = kube.server
    pool = "kcut"
    kube.baseline = kube.baseline or kube_inventory(server, ())
    make_pool(server, pool, agents=1, per_agent=8, network_mode="shared")
    made: set[str] = set()
    try:
        for r in range(ROUNDS):
            _cut_round(kube, demo_image, pool, r, made)
    finally:
        for gate in kube.gates:
            gate.heal()
        asyncio.run(delete_all(kube, set(made)))
        drop_pool(server, pool)


# -- 3. answered, not stored, then kill -9 ------------------------------------------------------


def _container_id(server: KubeServer, name: str, replica: int) -> str:
    got = server.fsb("get", name, "-o", "json", env=server.env_for(replica))
    if got.returncode != 0:
        return ""
    status = json.loads(got.stdout)["status"]
    return str(status.get("containerID", "")) if status.get("phase") == "Running" else ""


def test_a_fast_create_answered_before_its_record_survives_a_kill(
    kube: Kube, demo_image: str
) -> None:
    server = kube.server
    pool = "kunstored"
    name = "answered-unstored"
    kube.baseline = kube.baseline or kube_inventory(server, ())
    make_pool(server, pool, agents=1, per_agent=4, network_mode="shared")
    leader = server.wait_leader()
    follower = 1 - leader
    gate = kube.gates[follower]
    try:

        async def create(sandbox: str) -> str:
            async with kube.client(follower) as client:
                made = await client.create(sandbox, demo_image, pool=pool, command=SLEEP)
                return made.container_id

        # First one create through the follower while it reaches the apiserver: its watch
        # cache then holds the pool, the agent is up and the image is on the node.
        asyncio.run(create(f"{name}-first"))
        until("the first create's record", lambda: _container_id(server, f"{name}-first", 0), BOUND)
        # The follower answers a Fast create from its watch cache and the agent alone; its
        # record write, which follows the reply, is held at the cut gate.
        gate.cut()
        container = asyncio.run(create(name))
        assert container
        server.stop_replica(follower, signal.SIGKILL)
        gate.drop()
        gate.heal()
        # Not stored: the leader (through the apiserver) has no record of it.
        assert not exists(server, name, leader)
        assert container in server.containers()
        killed = time.monotonic()
        server.start_replica(follower)
        # Recovery (at the restarted replica's start) rebuilt the record from the container.
        for replica in (follower, leader):
            until(
                f"{name} Running with its container, seen by replica {replica}",
                lambda replica=replica: _container_id(server, name, replica) == container,
                BOUND,
            )
        rebuilt_s = time.monotonic() - killed
        got = server.fsb("exec", name, "--", "echo", "ok", env=server.env_for(leader))
        assert got.returncode == 0 and got.stdout == "ok\n", got.stderr
        inv, found = settled(kube, (pool,))
        report(
            "fast create answered, replica killed before its record", inv, found,
            follower=follower, rebuilt_within_s=round(rebuilt_s, 1),
        )  # fmt: skip
    finally:
        gate.heal()
        if (
            server.replicas[follower].proc is None
            or server.replicas[follower].proc.poll() is not None
        ):
            server.start_replica(follower)
        asyncio.run(delete_all(kube, {name, f"{name}-first"}))
        drop_pool(server, pool)


# -- 4. admission with two replicas ------------------------------------------------------------


async def _flood(
    kube: Kube, image: str, pool: str, count: int, ports: list[int]
) -> tuple[list[str], list[FsbError]]:
    admitted: list[str] = []
    refused: list[FsbError] = []
    clients = [kube.client(0), kube.client(1)]
    try:

        async def one(i: int) -> None:
            name = f"{pool}-{i}"
            try:
                await clients[i % 2].create(name, image, pool=pool, command=SLEEP, ports=ports)
            except FsbError as exc:
                refused.append(exc)
                return
            admitted.append(name)

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), 600)
    finally:
        for client in clients:
            await client.close()
    return admitted, refused


def _refusals(refused: list[FsbError], wanted: str) -> None:
    kinds = Counter(type(e).__name__ for e in refused)
    assert set(kinds) <= {"CapacityExhausted"}, (kinds, [e.message for e in refused][:5])
    for exc in refused:
        assert isinstance(exc, CapacityExhausted)
        assert wanted in exc.message, exc.message


def test_two_replicas_admit_exactly_the_capacity(kube: Kube, demo_image: str) -> None:
    server = kube.server
    pool = "kflood"
    per_agent = CAPACITY // 2
    kube.baseline = kube.baseline or kube_inventory(server, ())
    make_pool(server, pool, agents=2, per_agent=per_agent, network_mode="shared")
    try:
        admitted, refused = asyncio.run(_flood(kube, demo_image, pool, CREATES, []))
        assert len(admitted) == 2 * per_agent, (len(admitted), Counter(map(str, refused)))
        assert len(refused) == CREATES - 2 * per_agent
        _refusals(refused, "full")
        items = [i for i in server.fsb_json("list")["items"] if i["spec"]["poolRef"] == pool]
        assert sorted(i["metadata"]["name"] for i in items) == sorted(admitted)
        per = Counter(i["status"]["assignedAgent"] for i in items)
        assert max(per.values()) <= per_agent, per
        inv, found = settled(kube, (pool,))
        report(
            "admission flood, 2 replicas", inv, found, creates=CREATES,
            capacity=2 * per_agent, admitted=len(admitted), resource_exhausted=len(refused),
        )  # fmt: skip
    finally:
        drop_pool(server, pool)


def test_two_replicas_give_one_port_one_owner_per_agent(kube: Kube, demo_image: str) -> None:
    server = kube.server
    pool = "kports"
    port = 8080
    kube.baseline = kube.baseline or kube_inventory(server, ())
    make_pool(server, pool, agents=2, per_agent=8, network_mode="shared")
    try:
        admitted, refused = asyncio.run(_flood(kube, demo_image, pool, 40, [port]))
        items = [i for i in server.fsb_json("list")["items"] if i["spec"]["poolRef"] == pool]
        owners = Counter(i["status"]["assignedAgent"] for i in items)
        assert sorted(owners.values()) == [1, 1], (owners, admitted)
        assert len(admitted) == 2, admitted
        _refusals(refused, str(port))
        inv, found = settled(kube, (pool,))
        report(
            "port race, 2 replicas", inv, found, creates=40, admitted=len(admitted),
            resource_exhausted=len(refused),
        )  # fmt: skip
    finally:
        drop_pool(server, pool)
