"""`fsb controller` on a real kube-apiserver: what only the Kubernetes shape has.

- A Sandbox written straight to the apiserver (what `kubectl apply` does) converges to Running
  and is cleaned up by a `kubectl delete`.
- Two replicas serving the Fast-Path at once get 40 concurrent creates against a capacity of 3
  (one agent, `maxSandboxesPerAgent` 3, `poolMax` 1): exactly 3 succeed, the rest are
  RESOURCE_EXHAUSTED, and exactly 3 containers exist.
- Leader failover: `kill -9` of the Lease holder; the other replica takes the Lease (one
  transition later) and reconciles (a new declarative Sandbox converges, an expiry set before the
  kill fires).

Nothing here is timed: `benchmarks/leader_failover.py` prints takeover times and
`benchmarks/create_latency_kubernetes.py` create latencies.
Run: `.venv/bin/pytest -m kubernetes tests/e2e/test_kube_controller.py`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fastsandbox.errors import CapacityExhausted
from fastsandbox.sdk.aio import AsyncClient
from tests.e2e._kube_server import NAMESPACE, KubeServer, purge_kube
from tests.e2e._server import FSB
from tests.e2e.conftest import start_kube_server

pytestmark = [pytest.mark.e2e, pytest.mark.kubernetes]

LEASE_SECONDS = 3
LIVENESS_SECONDS = 90.0  # generous bound for a takeover on 2 shared cores; nothing is timed
SLEEP = ["--", "sleep", "3600"]


@pytest.fixture(scope="module")
def kube_server(request: pytest.FixtureRequest) -> Iterator[KubeServer]:
    srv = start_kube_server(request, replicas=2, lease_duration=LEASE_SECONDS)
    try:
        yield srv
    finally:
        purge_kube(srv)


def wait_phase(server: KubeServer, name: str, phase: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        result = server.fsb("get", name, "-o", "json")
        if result.returncode == 0:
            obj = json.loads(result.stdout)
            if obj["status"].get("phase") == phase:
                return obj
        time.sleep(0.2)
    raise AssertionError(f"{name} not {phase} within {timeout}s: {obj.get('status')}")


def wait_pool_ready(server: KubeServer, pool: str, agents: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        got = server.fsb("pool", "get", pool, "-o", "json")
        if got.returncode == 0:
            status = json.loads(got.stdout).get("status", {})
            if status.get("agents", {}).get("ready", 0) >= agents:
                return
        time.sleep(0.2)
    raise AssertionError(f"pool {pool} not ready with {agents} agent(s): {status}")


@functools.cache
def kubectl_binary() -> str:
    """The kubectl built next to the test apiserver (same version; cached, so this is quick)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "build-kube-apiserver"
    out = subprocess.run([str(script)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("KUBECTL="):
            return line.removeprefix("KUBECTL=")
    raise AssertionError(f"scripts/build-kube-apiserver printed no KUBECTL=: {out!r}")


def kubectl(server: KubeServer, *args: str, stdin: str | None = None) -> str:
    argv = [kubectl_binary(), "--kubeconfig", str(server.kubeconfig), "-n", NAMESPACE, *args]
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def apply_sandbox(server: KubeServer, name: str, **spec: Any) -> None:
    """`kubectl apply -f sandbox.yaml`: the object goes to the apiserver, not the Fast-Path; the
    controller finds it through its watch."""
    body = {
        "apiVersion": "fastsandbox.io/v1alpha1",
        "kind": "Sandbox",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"poolRef": "default-pool", **spec},
    }
    kubectl(server, "apply", "-f", "-", stdin=yaml.safe_dump(body))


def kubectl_delete(server: KubeServer, name: str) -> None:
    kubectl(server, "delete", "sandbox", name, "--ignore-not-found", "--wait=false")


def gone(server: KubeServer, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.fsb("get", name).returncode != 3:
        assert time.monotonic() < deadline, f"{name} still there {timeout}s after delete"
        time.sleep(0.2)


def test_every_replica_announces_where_the_api_token_is(kube_server: KubeServer) -> None:
    # The first replica made the Secret, the other read it; both serve with that token.
    said = ["".join(r.output) for r in kube_server.replicas]
    ns = kube_server.system_namespace
    assert sum(f"API token created Secret {ns}/fastsandbox-api-token" in s for s in said) == 1
    assert sum(f"API token in Secret {ns}/fastsandbox-api-token" in s for s in said) == 1
    assert all(f"kubectl -n {ns} get secret fastsandbox-api-token" in s for s in said)
    for i in range(len(kube_server.replicas)):
        listed = subprocess.run(
            [FSB, "list", "-o", "json"],
            capture_output=True,
            text=True,
            env=kube_server.env_for(i),
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr


def test_kubectl_apply_of_a_sandbox_converges_to_running(
    kube_server: KubeServer, demo_image: str
) -> None:
    apply_sandbox(
        kube_server,
        "applied",
        image=demo_image,
        command=["sh", "-c", "echo from-kubectl; sleep 3600"],
    )
    try:
        obj = wait_phase(kube_server, "applied", "Running", timeout=60)
        status = obj["status"]
        # The printer columns show what `fsb get` shows.
        row = kubectl(kube_server, "get", "sandboxes", "applied", "--no-headers").split()
        assert row[:3] == ["applied", "Running", status["assignedAgent"]], row
        assert status["assignedAgent"] and status["agentIP"]
        assert "fastsandbox.io/cleanup" in obj["metadata"]["finalizers"]
        cid = status["containerID"]
        assert cid in kube_server.running_tasks()
        # Each `fsb logs` is a CLI start and a call through a replica (a follower reads the
        # record from its watch cache): on a loaded machine a 15 s bound left room for only a
        # few tries. A liveness bound like the waits above, and the last answer if it fails.
        deadline = time.monotonic() + 60
        while "from-kubectl" not in (logs := kube_server.fsb("logs", "applied")).stdout:
            assert time.monotonic() < deadline, f"no output from the applied sandbox: {logs}"
            time.sleep(0.2)
    finally:
        kubectl_delete(kube_server, "applied")
    gone(kube_server, "applied")
    assert cid not in kube_server.containers()
    assert cid not in kube_server.snapshots()


async def _create_all(
    server: KubeServer, image: str, pool: str, count: int
) -> tuple[list[str], list[Exception], list[float]]:
    """`count` concurrent Fast creates, alternating between the two replicas' Fast-Paths."""
    clients = [
        AsyncClient(r.endpoint, server.token, NAMESPACE, timeout=120, ca_file=server.ca_file)
        for r in server.replicas
    ]
    made: list[str] = []
    refused: list[Exception] = []
    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        try:
            await clients[i % 2].create(f"burst-{i}", image, pool=pool, command=SLEEP[1:])
        except Exception as exc:
            refused.append(exc)
        else:
            made.append(f"burst-{i}")
            latencies.append((time.perf_counter() - started) * 1000)

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for client in clients:
            await client.close()
    return made, refused, latencies


def test_two_replicas_admit_exactly_the_capacity(kube_server: KubeServer, demo_image: str) -> None:
    pool = "cap3"
    made_pool = kube_server.fsb(
        "pool",
        "create",
        pool,
        *kube_server.pool_args,
        "--min",
        "1",
        "--max",
        "1",
        "--per-agent",
        "3",
    )
    assert made_pool.returncode == 0, made_pool.stderr
    made: list[str] = []
    try:
        wait_pool_ready(kube_server, pool, agents=1)
        # The image is cached on the agent first, so no create waits for a pull.
        warm = kube_server.fsb("run", "warm", "--image", demo_image, "--pool", pool, *SLEEP)
        assert warm.returncode == 0, warm.stderr
        assert kube_server.fsb("delete", "warm", "--wait").returncode == 0
        before = kube_server.containers()

        made, refused, latencies = asyncio.run(_create_all(kube_server, demo_image, pool, 40))
        assert len(made) == 3, {f"{type(e).__name__}: {e}" for e in refused}
        assert len(refused) == 37
        assert all(isinstance(e, CapacityExhausted) for e in refused), {
            type(e).__name__ for e in refused
        }
        # The agent really runs three, and the records say so.
        assert len(kube_server.containers() - before) == 3
        listed = kube_server.fsb_json("list")["items"]
        burst = [i for i in listed if i["metadata"]["name"].startswith("burst-")]
        assert sorted(i["metadata"]["name"] for i in burst) == sorted(made)
        assert {i["status"]["phase"] for i in burst} == {"Running"}
        print(
            f"\n40 concurrent creates over 2 replicas: 3 admitted "
            f"(client ms {', '.join(f'{x:.0f}' for x in sorted(latencies))}), 37 refused"
        )
    finally:
        for name in made:
            kube_server.fsb("delete", name, "--wait")
        kube_server.fsb("pool", "delete", pool)


def test_demand_on_a_follower_scales_the_pool(kube_server: KubeServer, demo_image: str) -> None:
    """A create on a follower (the CLI's replica) that finds the pool full waits while the pool
    grows: the leader, whose pool loop is the one that scales, gets the demand through the pool's
    annotation, and the follower places the create once it sees the new agent."""
    assert kube_server.leader() != 0
    pool = "grow"
    made = kube_server.fsb(
        "pool",
        "create",
        pool,
        *kube_server.pool_args,
        "--min",
        "1",
        "--max",
        "2",
        "--per-agent",
        "1",
    )
    assert made.returncode == 0, made.stderr
    names = ["grow-a", "grow-b", "grow-c"]
    try:
        wait_pool_ready(kube_server, pool, agents=1)
        first = kube_server.fsb("run", names[0], "--image", demo_image, "--pool", pool, *SLEEP)
        assert first.returncode == 0, first.stderr
        second = kube_server.fsb(
            "run", names[1], "--image", demo_image, "--pool", pool, "-o", "json", *SLEEP
        )
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["status"]["timings"].get("scaledMs") is not None
        agents = {kube_server.fsb_json("get", n)["status"]["assignedAgent"] for n in names[:2]}
        assert len(agents) == 2
        # Now at poolMax with every slot taken: refused at once, naming the command.
        third = kube_server.fsb("run", "grow-c", "--image", demo_image, "--pool", pool, *SLEEP)
        assert third.returncode == 5, third.stderr
        assert f"fsb pool scale {pool} --min 1 --max 3" in third.stderr, third.stderr
    finally:
        for name in names:
            kube_server.fsb("delete", name, "--wait")
        kube_server.fsb("pool", "delete", pool)


def test_creates_through_a_follower_report_ordered_timings(
    kube_server: KubeServer, demo_image: str
) -> None:
    """Sequential Fast creates through a follower replica's Fast-Path (the CLI's endpoint): each
    one succeeds, and its timings are in causal order (accepted, then scheduled, then the agent
    confirmed the start, all before the reply arrived). How fast is for
    `benchmarks/create_latency_kubernetes.py` (series `kube fast (follower)`)."""
    assert kube_server.wait_leader() != 0  # replica 0 serves the CLI's endpoint

    async def create_each() -> list[tuple[float, float | None, float | None, float]]:
        client = AsyncClient(
            kube_server.endpoint,
            kube_server.token,
            NAMESPACE,
            timeout=60,
            ca_file=kube_server.ca_file,
        )
        seen = []
        try:
            for i in range(3):
                started = time.perf_counter()
                result = await client.create(f"seq-{i}", demo_image, command=SLEEP[1:])
                client_ms = (time.perf_counter() - started) * 1000
                t = result.timings
                seen.append((t.accepted_ms, t.scheduled_ms, t.runtime_ready_ms, client_ms))
                await client.delete(f"seq-{i}", wait=True)
        finally:
            await client.close()
        return seen

    for accepted, scheduled, ready, client_ms in asyncio.run(create_each()):
        assert scheduled is not None and ready is not None
        assert 0 <= accepted <= scheduled <= ready <= client_ms


def test_leader_failover(kube_server: KubeServer, demo_image: str) -> None:
    leader = kube_server.wait_leader()
    follower = 1 - leader
    # Made before the kill, to expire after it: only a leader fires expiries.
    short = kube_server.fsb(
        "run", "expires", "--image", demo_image, "--ttl", "8", "-o", "json", *SLEEP
    )
    assert short.returncode == 0, short.stderr
    transitions = kube_server.lease().spec.leaseTransitions or 0  # type: ignore[union-attr]

    kube_server.stop_replica(leader, signal.SIGKILL)
    # How long a takeover takes is printed by benchmarks/leader_failover.py, not asserted: a
    # generous liveness bound only, then what must hold: the follower holds the Lease, one
    # transition later, and (below) it reconciles.
    taken = kube_server.wait_leader(lambda i: i == follower, timeout=LIVENESS_SECONDS)
    assert taken == follower
    lease = kube_server.lease().spec
    assert lease is not None and lease.leaseTransitions == transitions + 1

    # The new leader reconciles: a declarative Sandbox converges, the expiry fires.
    env = kube_server.env_for(follower)
    apply_sandbox(kube_server, "after-failover", image=demo_image, command=SLEEP[1:])
    try:
        deadline = time.monotonic() + 60
        phases: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name in ("after-failover", "expires"):
                got = _get(env, name)
                phases[name] = got.get("status", {}).get("phase", "") if got else ""
            if phases == {"after-failover": "Running", "expires": "Expired"}:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the new leader did not reconcile: {phases}")
        expired = _get(env, "expires")
        assert expired is not None and not expired["status"].get("containerID")
    finally:
        kubectl_delete(kube_server, "after-failover")
        kube_server.fsb("delete", "expires")
        kube_server.start()  # the killed replica comes back as a follower
    assert kube_server.leader() == follower


def _get(env: dict[str, str], name: str) -> dict[str, Any] | None:
    result = subprocess.run(
        [FSB, "get", name, "-o", "json"], capture_output=True, text=True, env=env, timeout=60
    )
    if result.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(result.stdout)
    return data
