"""Create latency of Fast Sandbox in the Kubernetes shape, against `ctr run -d` on the same
containerd and against the embedded shape, in one run.

Run as root after `scripts/setup` (etcd + kube-apiserver come from scripts/build-kube-apiserver,
cached in ~/.cache/fastsandbox/k8s-<version>/; a cold build needs Go and ~6 min):

    .venv/bin/python benchmarks/create_latency_kubernetes.py [-n 30] [--no-embedded] [--markdown]

It starts everything it measures on loopback and removes it afterwards, also on Ctrl-C or
SIGTERM: a docker-registry with the busybox demo image; for the embedded series an `fsb server`
with its own containerd, measured first and stopped before the cluster starts (an idle cluster
still renews Leases and would share the 2 CPUs); then a real etcd + kube-apiserver with our CRDs,
a containerd whose namespace `k8s.io` the agents use, the process kubelet (tests/k8s_kubelet.py)
running agent Pods as local processes, and two `fsb controller` replicas, one of which holds the
Lease. Every series uses pool `default-pool` (one agent, image already pulled by an untimed
warm-up create) and runs sequentially, n times; the three Kubernetes create series take turns
(leader fast, follower fast, follower strong, leader fast, ...) so load drift hits them alike:

  kube fast (leader)      SDK `AsyncClient.create()` called → reply received, against the Lease
                          holder's Fast-Path: gRPC + token + name and pool read from the
                          replica's watch cache + placement + agent create/start; the record
                          create and its status write follow the reply (Fast answers first)
  kube fast (follower)    same, against the replica that does not hold the Lease
  kube strong (follower)  same boundary, Strong mode: record create, then start, then the status
                          write
  kube acceptedMs         the reply's `timings.acceptedMs` (fast, follower): request arrival at
                          the replica → name and pool checked (watch cache; apiserver GETs
                          only before the cache has listed)
  kube runtimeReadyMs     the reply's `timings.runtimeReadyMs` (fast, follower): request arrival
                          → agent confirmed the task started (no record written yet)
  kube agent span         per create, runtimeReadyMs - scheduledMs (fast, follower): the agent's
                          Create RPC (containerd container + task create + start)
  kube after ready        per create, client time - runtimeReadyMs (fast, follower): the reply
                          and gRPC (the record is written after the reply)
  kube warm fast (follower)  same boundary as kube fast (follower), on pool `warm-pool`
                          (--warm-slots 1, the image prewarmed, shared network): before each
                          create the script waits, untimed, for the pool to show a ready slot
                          (the refill after the last claim); only creates that claimed a slot
                          (`timings.warm`) are samples, misses are counted and printed
  kube warm runtimeReadyMs   the reply's `timings.runtimeReadyMs` of those warm creates
  kube warm acceptedMs / scheduledMs / agent span / after ready
                          the same breakdown as for the cold follower series, of the warm
                          creates: name and pool checked, slot allocated, the agent's claim
                          (Create RPC), the reply
  embedded fast           SDK create called → reply, against `fsb server` (SQLite store)
  embedded acceptedMs     the reply's `timings.acceptedMs`, embedded (2 SQLite reads)
  embedded runtimeReadyMs the reply's `timings.runtimeReadyMs`, embedded
  embedded agent span     per create, runtimeReadyMs - scheduledMs, embedded
  embedded after ready    per create, client time - runtimeReadyMs, embedded (SQLite write)
  ctr run -d              `ctr run -d IMAGE ID sleep` process spawned → exited, on the cluster's
                          containerd, namespace k8s.io, same image (already unpacked); includes
                          ctr's own start-up

The creates run in a child interpreter (the process kubelet is a thread of this one). Each
sandbox (and ctr container) is deleted before the next create, outside the timed span.
Numbers are milliseconds, p50/p95/p99 by nearest rank, and the mean; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lightkube import Client, KubeConfig  # noqa: E402

from benchmarks.harness import wait_slot  # noqa: E402
from fastsandbox.sdk import AsyncClient  # noqa: E402
from tests.e2e._kube_server import (  # noqa: E402
    CONTAINERD_NS,
    DEFAULT_POOL,
    NAMESPACE,
    KubeServer,
    new_kube_server,
    purge_kube,
)
from tests.e2e._server import new_server, purge  # noqa: E402
from tests.infra import (  # noqa: E402
    ContainerdProc,
    RegistryProc,
    build_demo_image,
    missing_requirements,
    push_image,
    remove_cgroup,
    start_containerd,
    start_registry,
)
from tests.k8s_fixtures import install_crds  # noqa: E402
from tests.k8s_infra import KubeApiserverProc, start_kube_apiserver  # noqa: E402

TRAP_SLEEP = ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]

BOUNDARIES = {
    "kube fast (leader)": "SDK `create()` called → reply, Lease holder's Fast-Path: gRPC + token "
    "+ name/pool from the watch cache + placement + agent create/start (record written after)",
    "kube fast (follower)": "same, through the replica that does not hold the Lease",
    "kube warm fast (follower)": "same as kube fast (follower), pool warm-pool, creates that "
    "claimed a warm slot (untimed wait for a ready slot before each)",
    "kube warm runtimeReadyMs": "server: request arrival → agent confirmed the claimed slot's "
    "main process started (warm creates)",
    "kube warm acceptedMs": "server: request arrival → name and pool checked (warm creates)",
    "kube warm scheduledMs": "server: request arrival → a slot allocated, before the agent's "
    "Create RPC (warm creates)",
    "kube warm agent span": "server: scheduledMs → runtimeReadyMs per warm create: the agent's "
    "Create RPC claiming the slot",
    "kube warm after ready": "client time - runtimeReadyMs per warm create: the reply, gRPC, "
    "the client (the record is written after the reply)",
    "kube strong (follower)": "same, Strong mode (record create, then start, then status write)",
    "kube acceptedMs": "server: request arrival → name and pool checked (watch cache)",
    "kube runtimeReadyMs": "server: request arrival → agent confirmed the task started",
    "kube agent span": "server: scheduledMs → runtimeReadyMs per create: the agent's Create RPC "
    "(containerd container + task create + start)",
    "kube after ready": "client time - runtimeReadyMs per create: reply and gRPC (Fast: the "
    "record is written after the reply)",
    "embedded fast": "SDK `create()` called → reply, `fsb server` (SQLite store)",
    "embedded acceptedMs": "server: request arrival → name and pool checked (2 SQLite reads)",
    "embedded runtimeReadyMs": "server: request arrival → agent confirmed the task started",
    "embedded agent span": "server: scheduledMs → runtimeReadyMs per create, embedded",
    "embedded after ready": "client time - runtimeReadyMs per create: SQLite write, reply, gRPC",
    "ctr run -d": "`ctr` process spawned → exited, cluster's containerd (k8s.io), same image",
}


@dataclass
class CreateRun:
    """One series of sequential creates: client spans and what each reply reported."""

    client: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    scheduled: list[float] = field(default_factory=list)
    agent: list[float] = field(default_factory=list)
    after_ready: list[float] = field(default_factory=list)
    misses: int = 0  # warm series: creates that found no ready slot (not samples)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def row(name: str, values: list[float]) -> str:
    return (
        f"{name:<24} n={len(values):<4} p50={pct(values, 50):8.1f}  p95={pct(values, 95):8.1f}"
        f"  p99={pct(values, 99):8.1f}  mean={statistics.fmean(values):8.1f}  ms"
    )


def markdown_row(name: str, values: list[float]) -> str:
    cells = [f"{pct(values, q):.1f} ms" for q in (50, 95, 99)]
    return f"| {name} | {' | '.join(cells)} | {BOUNDARIES[name]} |"


@dataclass(frozen=True)
class Target:
    label: str
    endpoint: str
    mode: str
    pool: str = DEFAULT_POOL
    warm: bool = False


WARM_POOL = "warm-pool"


async def bench_fsb(targets: list[Target], token: str, image: str, n: int) -> dict[str, CreateRun]:
    """n creates per target, round-robin over the targets, so that drift in the machine's load
    (other work on the 2 cores) falls on every series alike."""
    runs = {t.label: CreateRun() for t in targets}
    clients = {t.label: AsyncClient(t.endpoint, token, NAMESPACE, timeout=120) for t in targets}
    try:
        for t in targets:
            # Warm-up: pulls the image on the agent (the first one) and opens every channel.
            client = clients[t.label]
            await client.create(f"warm-{t.label}", image, pool=t.pool, command=TRAP_SLEEP)
            await client.delete(f"warm-{t.label}", wait=True)
        for i in range(n):
            for t in targets:
                client, run, name = clients[t.label], runs[t.label], f"b-{t.label}-{i}"
                if t.warm:
                    await wait_slot(client, t.pool)
                started = time.perf_counter()
                result = await client.create(
                    name, image, pool=t.pool, command=TRAP_SLEEP, mode=t.mode
                )
                elapsed = (time.perf_counter() - started) * 1000
                if t.warm and not (result.timings and result.timings.warm):
                    run.misses += 1
                    await client.delete(name, wait=True)
                    continue
                run.client.append(elapsed)
                run.accepted.append(result.timings.accepted_ms)
                ready, scheduled = result.timings.runtime_ready_ms, result.timings.scheduled_ms
                if ready is not None:
                    run.ready.append(ready)
                    run.after_ready.append(elapsed - ready)
                    if scheduled is not None:
                        run.scheduled.append(scheduled)
                        run.agent.append(ready - scheduled)
                await client.delete(name, wait=True)
    finally:
        for client in clients.values():
            await client.close()
    return runs


def measure(
    targets: list[Target], token: str, image: str, n: int, ca_file: Path
) -> dict[str, CreateRun]:
    """`bench_fsb` in a child interpreter (this script with `--child`): the process kubelet runs
    on a thread of this one, and the client's event loop must not wait for the GIL behind it.
    The token goes through stdin, not argv. An exception here (Ctrl-C, SIGTERM) kills the child."""
    spec = {"targets": [asdict(t) for t in targets], "token": token, "image": image, "n": n}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "FSB_CA_FILE": str(ca_file)},  # the Fast-Path's CA (TLS)
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring child exited {proc.returncode}: {proc.stderr[-2000:]}")
    runs: dict[str, dict[str, list[float]]] = json.loads(proc.stdout)
    return {label: CreateRun(**fields) for label, fields in runs.items()}


def child_main() -> int:
    spec = json.load(sys.stdin)
    targets = [Target(**t) for t in spec["targets"]]
    runs = asyncio.run(bench_fsb(targets, spec["token"], spec["image"], spec["n"]))
    json.dump({label: asdict(run) for label, run in runs.items()}, sys.stdout)
    return 0


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    # Not a pipe: a detached container inherits these fds and would hold the pipe open.
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - started) * 1000


def bench_ctr(sock: Path, image: str, n: int, cgroup_parent: str) -> list[float]:
    ctr = ["ctr", "-a", str(sock), "-n", CONTAINERD_NS]

    def run_one(cid: str) -> float:
        # Under the benchmark's own cgroup, as the agents' sandboxes are, so nothing is left in
        # the hierarchy's `/k8s.io` that ctr would use by default.
        cgroup = f"{cgroup_parent}/ctr/{cid}"
        took = timed([*ctr, "run", "-d", "--cgroup", cgroup, image, cid, "sleep", "3600"])
        subprocess.run([*ctr, "tasks", "kill", "-s", "KILL", cid], capture_output=True)
        for _ in range(50):
            if subprocess.run([*ctr, "tasks", "delete", cid], capture_output=True).returncode == 0:
                break
            time.sleep(0.05)
        subprocess.run([*ctr, "containers", "delete", cid], capture_output=True)
        return took

    run_one("bench-ctr-warm")
    return [run_one(f"bench-ctr-{i}") for i in range(n)]


def wait_pool_ready(
    fsb: Callable[..., subprocess.CompletedProcess[str]], timeout: float, pool: str = DEFAULT_POOL
) -> None:
    deadline = time.monotonic() + timeout
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        got = fsb("pool", "get", pool, "-o", "json")
        if got.returncode == 0:
            status = json.loads(got.stdout).get("status", {})
            agents = status.get("agents")
            if isinstance(agents, dict) and agents.get("ready"):
                return
        time.sleep(0.2)
    raise RuntimeError(f"pool {pool} has no ready agent after {timeout}s: {status}")


def bench_embedded(registry: str, image: str, n: int) -> CreateRun:
    server = new_server(registry)
    try:
        server.start()
        wait_pool_ready(server.fsb, timeout=60)
        token = (server.data_dir / "token").read_text().strip()
        runs = measure([Target("emb", server.endpoint, "fast")], token, image, n, server.ca_file)
        return runs["emb"]
    finally:
        purge(server)


@dataclass
class Cluster:
    """What the Kubernetes series run on; every field is optional so cleanup can run at any
    point of the start-up."""

    work: Path
    cgroup_parent: str
    api: KubeApiserverProc | None = None
    containerd: ContainerdProc | None = None
    server: KubeServer | None = None
    startup: dict[str, float] = field(default_factory=dict)

    def start(self, registry: str, image: str) -> KubeServer:
        self.api = start_kube_apiserver(self.work)
        self.startup["etcd + kube-apiserver → /readyz"] = self.api.started_in
        began = time.monotonic()
        with contextlib.closing(
            Client(KubeConfig.from_file(self.api.kubeconfig), field_manager="fsb-bench")
        ) as client:
            install_crds(client)
        self.startup["CRDs applied → Established + served"] = time.monotonic() - began
        self.containerd = start_containerd(self.work)
        self.server = new_kube_server(
            self.api.kubeconfig,
            self.containerd.socket,
            registry,
            self.cgroup_parent,
            replicas=2,
        )
        began = time.monotonic()
        self.server.start()
        self.startup["kubelet + 2 controller replicas → ready"] = time.monotonic() - began
        began = time.monotonic()
        wait_pool_ready(self.server.fsb, timeout=90)
        self.startup["default-pool agent Pod → ready"] = time.monotonic() - began
        began = time.monotonic()
        made = self.server.fsb(
            "pool", "create", WARM_POOL, "--warm-slots", "1", "--prewarm-image", image,
            "--network-mode", "shared",
        )  # fmt: skip
        if made.returncode != 0:
            raise RuntimeError(f"fsb pool create {WARM_POOL}: {made.stderr}")
        wait_pool_ready(self.server.fsb, timeout=90, pool=WARM_POOL)
        self.startup[f"{WARM_POOL} agent Pod → ready"] = time.monotonic() - began
        return self.server

    def stop(self) -> None:
        steps: list[Callable[[], object]] = []
        if self.server is not None:
            steps.append(functools.partial(purge_kube, self.server))
        if self.containerd is not None:
            steps.append(self.containerd.stop)
        if self.api is not None:
            steps.append(self.api.stop)
        for step in steps:
            try:
                step()
            except Exception as exc:  # the other steps must still run
                print(f"cleanup step failed: {exc!r}", file=sys.stderr)


def keep_logs(source: Path, dest: Path) -> None:
    """Every `*.log` under `source` (controllers, agent Pods), same relative paths, in `dest`."""
    for path in source.rglob("*.log"):
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(path, target)
    print(f"logs kept in {dest}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="samples per series")
    parser.add_argument(
        "--no-embedded", action="store_true", help="skip the embedded `fsb server` series"
    )
    parser.add_argument(
        "--markdown", action="store_true", help="also print the table as Markdown (for docs)"
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy the controllers' and agent Pods' logs into DIR before cleaning up (profiling)",
    )
    parser.add_argument(
        "--json", type=Path, metavar="PATH", help="also write every series' samples (ms) here"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main()
    why = missing_requirements()
    if why:
        print(f"cannot run here: {why}", file=sys.stderr)
        return 2
    # A timeout's SIGTERM must still run the cleanup below (Ctrl-C does, as KeyboardInterrupt).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = Path(tempfile.mkdtemp(prefix="fsb-bench-kube-", dir="/tmp"))
    cluster = Cluster(work=work, cgroup_parent=f"/fsb-bench-{os.getpid()}")
    registry: RegistryProc | None = None
    series: dict[str, list[float]] = {}
    try:
        registry = start_registry(work)
        image = push_image(build_demo_image(work), registry.addr, "busybox:latest")

        if not args.no_embedded:
            embedded = bench_embedded(registry.addr, image, args.n)
            series["embedded fast"] = embedded.client
            series["embedded acceptedMs"] = embedded.accepted
            series["embedded runtimeReadyMs"] = embedded.ready
            series["embedded agent span"] = embedded.agent
            series["embedded after ready"] = embedded.after_ready

        server = cluster.start(registry.addr, image)
        leader = server.wait_leader()
        follower = 1 - leader
        targets = [
            Target("lead", server.replicas[leader].endpoint, "fast"),
            Target("follow", server.replicas[follower].endpoint, "fast"),
            Target("strong", server.replicas[follower].endpoint, "strong"),
            Target("warm", server.replicas[follower].endpoint, "fast", WARM_POOL, warm=True),
        ]
        runs = measure(targets, server.token, image, args.n, server.ca_file)
        on_follower = runs["follow"]
        assert cluster.containerd is not None
        ctr = bench_ctr(cluster.containerd.socket, image, args.n, cluster.cgroup_parent)
        if server.leader() != leader:
            print("note: the Lease changed hands during the run", file=sys.stderr)

        series = {
            "kube fast (leader)": runs["lead"].client,
            "kube fast (follower)": on_follower.client,
            "kube strong (follower)": runs["strong"].client,
            "kube acceptedMs": on_follower.accepted,
            "kube runtimeReadyMs": on_follower.ready,
            "kube agent span": on_follower.agent,
            "kube after ready": on_follower.after_ready,
            "kube warm fast (follower)": runs["warm"].client,
            "kube warm runtimeReadyMs": runs["warm"].ready,
            "kube warm acceptedMs": runs["warm"].accepted,
            "kube warm scheduledMs": runs["warm"].scheduled,
            "kube warm agent span": runs["warm"].agent,
            "kube warm after ready": runs["warm"].after_ready,
            **series,
            "ctr run -d": ctr,
        }
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        print(
            f"\nFast Sandbox create latency, Kubernetes shape, {args.n} sequential samples each "
            f"({os.cpu_count()} CPUs, busybox image cached, {now})"
        )
        for what, seconds in cluster.startup.items():
            print(f"  start-up: {what}: {seconds:.1f} s")
        for name, values in series.items():
            print(row(name, values))
        print(f"  warm creates that found no ready slot (not samples): {runs['warm'].misses}")
        print("boundaries:")
        for name in series:
            print(f"  {name:<24} {BOUNDARIES[name]}")
        if args.json is not None:
            args.json.write_text(json.dumps({"series": series, "misses": runs["warm"].misses}))
        if args.markdown:
            print("\n| series | p50 | p95 | p99 | boundary |\n|---|---|---|---|---|")
            for name, values in series.items():
                print(markdown_row(name, values))
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave processes and mounts behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if args.keep_logs is not None and cluster.server is not None:
            keep_logs(cluster.server.work_dir, args.keep_logs)
        cluster.stop()
        if registry is not None:
            with contextlib.suppress(Exception):
                registry.stop()
        remove_cgroup(cluster.cgroup_parent)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
