"""`fsb controller` replicas for end-to-end tests of the Kubernetes shape, with the surface of
`tests.e2e._server.Server` (endpoint, env, fsb/fsb_json, start/stop, containers/snapshots/tasks),
so the same CLI/SDK acceptance tests run on both shapes.

The cluster is the session's real etcd + kube-apiserver with our CRDs; agent Pods are run by a
process kubelet (tests/k8s_kubelet.py) on a node of this server's own, in a thread with its own
event loop (the tests themselves are synchronous and call `fsb` as subprocesses). Agents drive the
session's test containerd in namespace `k8s.io`, as they drive the node's on a real cluster.

Every replica runs exactly as a user runs it (`fsb controller --kubeconfig ...`). Replica 0 is
the Fast-Path the CLI talks to (`endpoint`); the first replica started takes the Lease, and it is
started last-indexed first, so the CLI's replica is a follower and the split is exercised on
every test. Teardown deletes every sandbox and pool of namespace `default` through the CLI,
stops the replicas and the kubelet (killing the agent processes), removes leftover containers of
this server's agents from containerd, and deletes the controller's namespace.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lightkube import ApiError, AsyncClient, Client, KubeConfig
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Namespace, Pod, Secret

from fastsandbox._kube.resources import SandboxPoolResource, SandboxResource
from tests.e2e._server import FSB, ServerSurface, free_port
from tests.k8s_fixtures import remove_all
from tests.k8s_kubelet import (
    AGENT_ARGV,
    AGENT_IMAGE,
    CONTAINERD_SOCKET,
    STATE_ROOT,
    CriEmulation,
    ProcessKubelet,
)

T = TypeVar("T")

CONTAINERD_NS = "k8s.io"
NAMESPACE = "default"
DEFAULT_POOL = "default-pool"
LEASE = "fastsandbox-controller"
API_TOKEN_SECRET = "fastsandbox-api-token"
CREDENTIALS_LABEL = "fastsandbox.io/agent-credentials"
TLS_SECRET = "fastsandbox-fastpath-tls"


class KubeletThread:
    """A `ProcessKubelet` on an event loop of its own thread."""

    def __init__(
        self,
        kubeconfig: Path,
        *,
        host_paths: dict[str, Path],
        work_dir: Path,
        node: str,
        cri: CriEmulation,
        pod_network: bool = False,
        loopback_ports: tuple[int, ...] = (),
    ) -> None:
        self.pod_network = pod_network
        self.loopback_ports = loopback_ports
        self.kubeconfig = kubeconfig
        self.cri = cri
        self.host_paths = host_paths
        self.work_dir = work_dir
        self.node = node
        self.loop = asyncio.new_event_loop()
        self.kubelet: ProcessKubelet | None = None
        self._client: AsyncClient | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=node)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def start(self) -> None:
        self._thread.start()

        async def start() -> None:
            self._client = AsyncClient(config=KubeConfig.from_file(self.kubeconfig))
            self.kubelet = ProcessKubelet(
                self._client,
                images={AGENT_IMAGE: list(AGENT_ARGV)},
                host_paths=self.host_paths,
                work_dir=self.work_dir,
                node=self.node,
                kill_cap=5.0,
                cri=self.cri,
                pod_network=self.pod_network,
                loopback_ports=self.loopback_ports,
            )
            await self.kubelet.start()

        self.call(start())

    def stop(self) -> None:
        async def stop() -> None:
            if self.kubelet is not None:
                await self.kubelet.stop()
            if self._client is not None:
                await self._client.close()

        with contextlib.suppress(Exception):
            self.call(stop(), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()

    def pid(self, namespace: str, pod: str) -> int | None:
        assert self.kubelet is not None
        return self.kubelet.pid(namespace, pod)

    def pods(self) -> set[str]:
        """Names of every Pod this kubelet ever ran (its work dir keeps their logs)."""
        pods = self.work_dir / "pods"
        return {p.name.split("_", 1)[1] for p in pods.iterdir()} if pods.exists() else set()


@dataclass
class Replica:
    identity: str
    endpoint: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    output: list[str] = field(default_factory=list)
    # Where this replica reaches the apiserver, when not the cluster's kubeconfig (a fault test
    # puts a gate of its own in between: tests/fault/_kube.py).
    kubeconfig: Path | None = None


@dataclass
class KubeServer(ServerSurface):
    """N `fsb controller` replicas over one cluster (see the module docstring)."""

    containerd_namespace = CONTAINERD_NS  # the node's image cache, as on Kubernetes
    # Without `pod_network` agent Pods run in the test's own network namespace, where an agent
    # must not set rules: shared. With it, the pools' default (private): see
    # tests/e2e/test_kube_private_network.py.
    pool_args = ("--network-mode", "shared")

    kubeconfig: Path
    containerd_socket: Path
    registry: str
    cgroup_parent: str
    work_dir: Path
    replicas: list[Replica]
    system_namespace: str
    lease_duration: int = 5
    extra_args: list[str] = field(default_factory=list)
    kubelet: KubeletThread | None = None
    pod_network: bool = False
    """Agent Pods in network namespaces of their own, bounded by their capabilities."""
    token: str = ""
    shape: str = "kubernetes"

    # -- the Server surface ----------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return self.replicas[0].endpoint

    @property
    def ca_file(self) -> Path:
        """The CA of the controllers' Fast-Path certificate (Secret fastsandbox-fastpath-tls,
        key ca.crt), copied out once they are ready."""
        return self.work_dir / "ca.crt"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FSB_ENDPOINT=self.endpoint,
            FSB_TOKEN=self.token,
            FSB_NAMESPACE=NAMESPACE,
            FSB_CA_FILE=str(self.ca_file),
        )
        env.pop("FSB_DATA_DIR", None)
        return env

    def env_for(self, replica: int) -> dict[str, str]:
        return {**self.env, "FSB_ENDPOINT": self.replicas[replica].endpoint}

    def start(self, timeout: float = 90.0) -> None:
        """Start every replica that is not running (the highest index first: it leads)."""
        if self.kubelet is None:
            self.kubelet = KubeletThread(
                self.kubeconfig,
                host_paths={
                    CONTAINERD_SOCKET: self.containerd_socket,
                    STATE_ROOT: self.work_dir / "host-state",
                },
                work_dir=self.work_dir / "kubelet",
                node=f"e2e-{uuid.uuid4().hex[:6]}",
                # Agents find "their Pod's" sandbox in containerd, as on a real node.
                cri=CriEmulation(
                    socket=self.containerd_socket, cgroup_root=f"{self.cgroup_parent}/kubepods"
                ),
                pod_network=self.pod_network,
                # Agents pull from the session's registry on the host's loopback.
                loopback_ports=(int(self.registry.rsplit(":", 1)[1]),),
            )
            (self.work_dir / "host-state").mkdir(parents=True, exist_ok=True)
            self.kubelet.start()
        for index in reversed(range(len(self.replicas))):
            replica = self.replicas[index]
            if replica.proc is None or replica.proc.poll() is not None:
                self.start_replica(index, timeout)
        if not self.token:
            self.token = self._read_token()
        if not self.ca_file.exists():
            self.ca_file.write_bytes(self._read_secret(TLS_SECRET, "ca.crt"))

    def start_replica(self, index: int, timeout: float = 90.0) -> None:
        replica = self.replicas[index]
        if replica.proc is not None and replica.proc.stdout is not None:
            replica.proc.stdout.close()
        argv = [
            FSB,
            "controller",
            "--kubeconfig",
            str(replica.kubeconfig or self.kubeconfig),
            "--namespace",
            self.system_namespace,
            "--watch-namespace",
            NAMESPACE,
            "--listen",
            replica.endpoint,
            "--agent-image",
            AGENT_IMAGE,
            "--identity",
            replica.identity,
            "--lease-duration",
            str(self.lease_duration),
            "--insecure-registry",
            self.registry,
            # The test containerd's (tests/infra.py): the shims mount the disk limit under it.
            "--node-containerd-state",
            str(self.containerd_socket.parent / "state"),
            "--log-format",
            "json",
            "--log-file",
            str(replica.log),
            *self.extra_args,
        ]
        env = dict(os.environ)
        for key in ("FSB_TOKEN", "FSB_ENDPOINT", "KUBECONFIG"):
            env.pop(key, None)
        with replica.log.with_suffix(".stderr").open("a") as stderr:
            replica.proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=stderr,
                bufsize=0,  # select() must see every byte not yet read: no buffer in between
                env=env,
                start_new_session=True,
            )
        assert replica.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if replica.proc.poll() is not None:
                raise RuntimeError(
                    f"fsb controller {replica.identity} exited {replica.proc.returncode}: "
                    f"{self.log_tail(index)}"
                )
            ready, _, _ = select.select([replica.proc.stdout], [], [], 0.2)
            if ready:
                line = replica.proc.stdout.readline().decode(errors="replace")
                replica.output.append(line)
                if "ready on" in line:
                    return
        raise RuntimeError(f"fsb controller not ready in {timeout}s: {self.log_tail(index)}")

    def log_tail(self, index: int = 0, size: int = 3000) -> str:
        replica = self.replicas[index]
        text = "".join(replica.output)
        for path in (replica.log, replica.log.with_suffix(".stderr")):
            if path.exists():
                text += path.read_text(errors="replace")
        return text[-size:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop every replica; the exit code of replica 0."""
        codes = [self.stop_replica(i, sig, timeout) for i in range(len(self.replicas))]
        return codes[0]

    def stop_replica(
        self, index: int, sig: int = signal.SIGTERM, timeout: float = 30.0
    ) -> int | None:
        proc = self.replicas[index].proc
        if proc is None:
            return None
        try:
            if proc.poll() is not None:
                return proc.returncode
            proc.send_signal(sig)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(10)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    # -- Kubernetes only -------------------------------------------------------------------
    def admin(self) -> Client:
        return Client(KubeConfig.from_file(self.kubeconfig), field_manager="fastsandbox-tests")

    def _read_token(self) -> str:
        return self._read_secret(API_TOKEN_SECRET, "token").decode()

    def _read_secret(self, name: str, key: str) -> bytes:
        with contextlib.closing(self.admin()) as client:
            secret = client.get(Secret, name, namespace=self.system_namespace)
        assert secret.data is not None
        return base64.b64decode(secret.data[key])

    def lease(self) -> Lease:
        with contextlib.closing(self.admin()) as client:
            return client.get(Lease, LEASE, namespace=self.system_namespace)

    def leader(self) -> int | None:
        """Index of the replica holding the Lease (None: nobody, or a stranger)."""
        spec = self.lease().spec
        holder = spec.holderIdentity if spec is not None else None
        for index, replica in enumerate(self.replicas):
            if replica.identity == holder:
                return index
        return None

    def wait_leader(
        self, accept: Callable[[int], bool] = lambda _i: True, timeout: float = 30.0
    ) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ApiError):
                index = self.leader()
                if index is not None and accept(index):
                    return index
            time.sleep(0.1)
        raise AssertionError(f"no acceptable leader within {timeout}s")

    def agent_pid(self, agent: str) -> int:
        assert self.kubelet is not None
        pid = self.kubelet.pid(NAMESPACE, agent)
        assert pid is not None, f"agent Pod {agent} is not running"
        return pid


def new_kube_server(
    kubeconfig: Path,
    containerd_socket: Path,
    registry: str,
    cgroup_parent: str,
    *,
    replicas: int = 2,
    lease_duration: int = 5,
    default_pool: bool = True,
    extra_args: tuple[str, ...] = (),
    pod_network: bool = False,
) -> KubeServer:
    work_dir = Path(tempfile.mkdtemp(prefix="fsb-kube-e2e-", dir="/tmp"))
    suffix = uuid.uuid4().hex[:6]
    system = f"fsb-system-{suffix}"
    with contextlib.closing(
        Client(KubeConfig.from_file(kubeconfig), field_manager="fastsandbox-tests")
    ) as client:
        client.create(Namespace(metadata=ObjectMeta(name=system)))
        if default_pool:
            _ensure_default_pool(client, private=pod_network)
    return KubeServer(
        kubeconfig=kubeconfig,
        containerd_socket=containerd_socket,
        registry=registry,
        cgroup_parent=cgroup_parent,
        work_dir=work_dir,
        replicas=[
            Replica(
                identity=f"ctl-{i}-{suffix}",
                endpoint=f"127.0.0.1:{free_port()}",
                log=work_dir / f"controller-{i}.log",
            )
            for i in range(replicas)
        ],
        system_namespace=system,
        lease_duration=lease_duration,
        extra_args=list(extra_args),
        pod_network=pod_network,
    )


def _ensure_default_pool(client: Client, *, private: bool = False) -> None:
    """What `fsb server` makes at its first start: pool `default-pool` in `default`. Private
    (the default networkMode) only when agent Pods have namespaces of their own
    (`pod_network`); in the test's namespace an agent must not set rules, so shared."""
    spec: dict[str, object] = {"capacity": {"poolMin": 1, "poolMax": 1}, "maxSandboxesPerAgent": 5}
    if not private:
        spec["networkMode"] = "shared"
    body = SandboxPoolResource.from_dict(
        {
            "apiVersion": "fastsandbox.io/v1alpha1",
            "kind": "SandboxPool",
            "metadata": {"name": DEFAULT_POOL, "namespace": NAMESPACE},
            "spec": spec,
        }
    )
    try:
        client.create(body)
    except ApiError as exc:
        if exc.status.code != 409:
            raise


def purge_kube(server: KubeServer) -> None:
    """Remove everything the server made (see the module docstring); never raises."""
    running = any(r.proc is not None and r.proc.poll() is None for r in server.replicas)
    if running and server.token:
        with contextlib.suppress(Exception):
            with contextlib.closing(server.admin()) as client:
                names = [
                    s.metadata.name
                    for s in client.list(SandboxResource, namespace=NAMESPACE)
                    if s.metadata is not None and s.metadata.name
                ]
            for name in names:
                server.fsb("delete", name, "--wait", timeout=60)
    server.stop()
    with contextlib.suppress(Exception), contextlib.closing(server.admin()) as client:
        for res in (SandboxResource, SandboxPoolResource):
            remove_all(client, res, NAMESPACE)
    agents = server.kubelet.pods() if server.kubelet is not None else set()
    if server.kubelet is not None:
        server.kubelet.stop()
    with contextlib.suppress(Exception), contextlib.closing(server.admin()) as client:
        for pod in client.list(Pod, namespace=NAMESPACE):
            if pod.metadata is not None and pod.metadata.name in agents:
                with contextlib.suppress(ApiError):
                    client.delete(Pod, pod.metadata.name, namespace=NAMESPACE, grace_period=0)
        # The agents' credentials Secrets (no garbage collector deletes them with the pool here).
        for secret in client.list(Secret, namespace=NAMESPACE, labels={CREDENTIALS_LABEL: None}):
            if secret.metadata is not None and secret.metadata.name:
                with contextlib.suppress(ApiError):
                    client.delete(Secret, secret.metadata.name, namespace=NAMESPACE)
        with contextlib.suppress(ApiError):
            client.delete(Namespace, server.system_namespace)
    _remove_containers_of(server, agents)
    _unmount_under(server.work_dir)
    keep = os.environ.get("FSB_E2E_KEEP_LOGS")
    if keep:
        # Controller and agent logs of this server, for a failure to be read afterwards.
        with contextlib.suppress(OSError):
            shutil.copytree(
                server.work_dir,
                Path(keep) / server.work_dir.name,
                ignore=shutil.ignore_patterns("*.sock", "fsb-init"),
                ignore_dangling_symlinks=True,
            )
    shutil.rmtree(server.work_dir, ignore_errors=True)


def _remove_containers_of(server: KubeServer, agents: set[str]) -> None:
    def ctr(*argv: str) -> str:
        try:
            return server.ctr(*argv)
        except (subprocess.SubprocessError, OSError):
            return ""

    for agent in agents:
        for cid in ctr("containers", "ls", "-q", f'labels."fastsandbox.io/agent"=={agent}').split():
            ctr("tasks", "kill", "-a", "-s", "KILL", cid)
            for _ in range(50):
                ctr("tasks", "delete", "-f", cid)
                if cid not in ctr("tasks", "ls", "-q").split():
                    break
                time.sleep(0.1)
            ctr("containers", "delete", cid)
            ctr("snapshots", "rm", cid)


def _unmount_under(root: Path) -> None:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    targets = [m.split()[1] for m in mounts if m.split()[1].startswith(str(root))]
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)
