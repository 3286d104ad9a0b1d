"""A process kubelet for the Kubernetes test tier: Pods run as local processes.

There is no kubelet, scheduler or controller-manager next to the test apiserver, so this fixture
plays their part for the Pods the tests (and the code under test) create:

- **Node** `local-0`, Ready, with an InternalIP, capacity and nodeInfo. Nothing marks it NotReady
  (no node controller), so no lease heartbeat is needed.
- **Scheduler**: every Pod without `spec.nodeName` (and whose `nodeSelector` fits) is bound here.
- **Kubelet**: each container of a Pod bound here becomes a local process.
  - The image is mapped to a command by the `images` table (fnmatch patterns, e.g. the agent
    image → `[python, -m, fastsandbox.agent]`); the container's `command` replaces it, its `args`
    are appended, after `$(VAR)` expansion from the container's resolved env.
  - Env: `value`, `fieldRef` (metadata.name/namespace/uid/labels/annotations, spec.nodeName,
    spec.serviceAccountName, status.podIP(s), status.hostIP(s)), `secretKeyRef`,
    `configMapKeyRef`, `envFrom`. A missing Secret keeps the container waiting in
    `CreateContainerConfigError` and is retried, as a kubelet does.
  - Every Pod gets its own loopback address `127.0.x.y` (all of 127/8 is on `lo`), so every agent
    can listen on the same port. With `pod_network=True` each Pod instead gets a network
    namespace of its own behind a /31 veth from the host (tests/k8s_podnet.py), its processes run
    in it, and the container's `securityContext.capabilities` (drop ALL + add) bound them
    (`setpriv`), as a container runtime would: an agent Pod then has a real Pod namespace and
    only the capabilities its manifest asks for.
  - Volumes: a `hostPath` must be named in the `host_paths` table (host path → local path; a
    test never touches the real `/run/containerd` or `/var/lib`); an `emptyDir` is a fresh
    directory; a `secret` is a directory of one file per key (`defaultMode`), written at each
    container start (a missing Secret waits in `CreateContainerConfigError`, as env does).
    There is no mount namespace, so mount paths appearing in the command, args or env are
    rewritten to the local paths. An unmapped hostPath fails the container's config.
  - stdout/stderr go to `<work_dir>/pods/<ns>_<name>/<container>.log`.
  - Status is patched as a kubelet would: `Running`, `podIP(s)`, `hostIP(s)`, `startTime`,
    conditions, `containerStatuses` (`containerID: proc://<pid>`); `Ready` only once the
    `tcpSocket` readiness probe connects. Exits become `terminated` states; `restartPolicy`
    Always/OnFailure restarts with backoff (restartCount, lastState), Never ends the Pod
    `Succeeded`/`Failed`.
  - Deletion (a `deletionTimestamp`): SIGTERM to each process group, `min(grace, kill_cap)`
    seconds, SIGKILL, then DELETE with grace 0, without which the Pod stays Terminating forever.
- **CRI sandbox** (optional, `cri`): for each Pod a container record like the one containerd's
  CRI plugin makes for a Pod's "pause" sandbox (labels `io.cri-containerd.kind=sandbox`,
  `io.kubernetes.pod.uid`; runtime spec naming the network namespace and
  `<cgroup_root>/pod<uid>/...`), in containerd namespace `k8s.io`, so an agent started with
  `--pod-uid` finds "its Pod" exactly as on a real node. The network namespace is this test
  process's own (where the Pod's 127.0.x.y lives), or the Pod's own with `pod_network`; the
  cgroup is under the test's cgroup.
- **Garbage collector**: Pods none of whose ownerReferences still exist (by uid) are deleted.

Teardown kills every process and force-deletes the Pods bound to the node, then the node.

Fixtures (registered in tests/conftest.py): `process_kubelet` (one per test; needs
`kube_apiserver`), configured by three fixtures a test module may override or parametrize
indirectly: `kubelet_images` (default: `AGENT_IMAGE` → `python -m fastsandbox.agent`),
`kubelet_host_paths` (default: the containerd socket → the test containerd's, `/var/lib/fastsandbox`
→ a per-test dir) and `kubelet_cri` (default: Pod sandboxes recorded in the test containerd,
cgroups under `<cgroup_parent>/kubepods`; None turns it off).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import json
import logging
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx
import msgspec
import pytest
from google.protobuf import any_pb2
from lightkube import ALL_NS, ApiError, AsyncClient, KubeConfig
from lightkube.core.resource_registry import resource_registry
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import (
    ConfigMap,
    Node,
    NodeStatus,
    Pod,
    PodBinding,
    PodStatus,
    Secret,
)
from lightkube.types import PatchType

from fastsandbox.agent.runtime._containerd_api import ContainerdApi
from fastsandbox.api._proto.fastsandbox.v1 import containerd_subset_pb2 as pb
from fastsandbox.errors import AlreadyExists as FsbAlreadyExists
from fastsandbox.errors import NotFound as FsbNotFound
from tests import k8s_podnet
from tests.k8s_podnet import PodNet

log = logging.getLogger(__name__)

NODE = "local-0"
HOST_IP = "127.0.0.1"
# The image the agent Pods of the tests use, and what it runs here.
AGENT_IMAGE = "fastsandbox.test/agent:dev"
# The image's entrypoint, as in the real image (scripts/build-image): `fsb`; the Pod gives `agent`.
AGENT_ARGV = (str(Path(sys.executable).parent / "fsb"),)
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
STATE_ROOT = "/var/lib/fastsandbox"
# How long a deleted Pod's processes get after SIGTERM at most, whatever their grace period.
KILL_CAP = 10.0
# Readiness probes run at least this often, whatever their periodSeconds (tests wait on them).
PROBE_PERIOD_CAP = 0.5
MAX_BACKOFF = 10.0
# Pass-through environment of every process: what a Python process needs on this machine.
BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "FSB_INIT_PATH", "TMPDIR")
# Plural names of owner kinds the garbage collector may meet (anything else: kind + "s").
OWNER_PLURALS = {"SandboxPool": "sandboxpools", "Sandbox": "sandboxes"}


@dataclass(frozen=True)
class CriEmulation:
    """Where to record Pod sandboxes: a containerd socket, and the cgroup Pods live under."""

    socket: Path
    cgroup_root: str
    namespace: str = "k8s.io"


class ConfigError(Exception):
    """The container cannot be started as configured (kubelet: CreateContainerConfigError)."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known names are replaced, unknown ones kept verbatim,
    `$$` is a literal `$`."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and (end := text.find(")", i + 2)) != -1:
            name = text[i + 2 : end]
            out.append(env.get(name, text[i : end + 1]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128+N


@dataclass
class _Container:
    spec: dict[str, Any]
    log: Path
    proc: asyncio.subprocess.Process | None = None
    started_at: str = ""
    restarts: int = 0
    ready: bool = False
    waiting: dict[str, str] | None = field(default_factory=lambda: {"reason": "ContainerCreating"})
    terminated: dict[str, Any] | None = None
    last_terminated: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])


@dataclass
class _PodRun:
    uid: str
    namespace: str
    name: str
    ip: str
    pod: dict[str, Any]
    dir: Path
    containers: dict[str, _Container] = field(default_factory=dict)
    deleting: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False
    task: asyncio.Task[None] | None = None
    start_time: str = field(default_factory=_now)
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    last_status: dict[str, Any] | None = None
    status_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    net: PodNet | None = None
    forwards: list[asyncio.Server] = field(default_factory=list)

    def condition(self, kind: str, ok: bool) -> dict[str, str]:
        value = "True" if ok else "False"
        old = self.transitions.get(kind)
        if old is None or old[0] != value:
            self.transitions[kind] = (value, _now())
        return {"type": kind, "status": value, "lastTransitionTime": self.transitions[kind][1]}


class ProcessKubelet:
    """Node + scheduler + kubelet + garbage collector for one test (see the module docstring)."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        images: Mapping[str, Sequence[str]],
        host_paths: Mapping[str, str | Path],
        work_dir: Path,
        node: str = NODE,
        kill_cap: float = KILL_CAP,
        gc_interval: float = 1.0,
        base_env: Mapping[str, str] | None = None,
        cri: CriEmulation | None = None,
        pod_network: bool = False,
        loopback_ports: Sequence[int] = (),
    ) -> None:
        self.client = client
        self.cri = cri
        self.pod_network = pod_network
        # With `pod_network`: host loopback ports each Pod reaches on its own 127.0.0.1 (the
        # session's registry; k8s_podnet.forward_loopback).
        self.loopback_ports = list(loopback_ports)
        self.images = {k: list(v) for k, v in images.items()}
        self.host_paths = {k.rstrip("/") or "/": Path(v) for k, v in host_paths.items()}
        self.work_dir = work_dir
        self.node = node
        self.node_labels = {
            "kubernetes.io/hostname": node,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        self.kill_cap = kill_cap
        self.gc_interval = gc_interval
        self.base_env = (
            dict(base_env)
            if base_env is not None
            else {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
        )
        self.runs: dict[str, _PodRun] = {}  # by Pod uid
        self._tasks: list[asyncio.Task[None]] = []
        self._ips: set[str] = set()
        self._next_ip = random.randrange(0, 250 * 250)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        await self._register_node()
        self._tasks = [
            asyncio.create_task(self._pods_loop(), name="kubelet-pods"),
            asyncio.create_task(self._gc_loop(), name="kubelet-gc"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        runs = list(self.runs.values())
        for run in runs:
            if run.task is not None:
                run.task.cancel()
        await asyncio.gather(*(r.task for r in runs if r.task), return_exceptions=True)
        await asyncio.gather(*(self._kill(r, grace=0.0) for r in runs))
        if self.cri is not None:
            for run in runs:
                await self._cri_sandbox(run, create=False)
        for run in runs:
            await self._remove_net(run)
        with contextlib.suppress(ApiError, httpx.HTTPError):
            async for pod in self.client.list(
                Pod, namespace=ALL_NS, fields={"spec.nodeName": self.node}
            ):
                assert pod.metadata is not None and pod.metadata.name is not None
                await self._force_delete(pod.metadata.namespace or "default", pod.metadata.name)
        with contextlib.suppress(ApiError, httpx.HTTPError):
            await self.client.delete(Node, self.node)
        self.runs.clear()

    # -- for tests ---------------------------------------------------------------------------
    def find(self, namespace: str, name: str) -> _PodRun | None:
        """The live run of Pod `namespace/name`, if this kubelet runs it."""
        for run in self.runs.values():
            if (run.namespace, run.name) == (namespace, name) and not run.gone:
                return run
        return None

    def pid(self, namespace: str, name: str, container: str | None = None) -> int | None:
        run = self.find(namespace, name)
        if run is None:
            return None
        c = run.containers.get(container) if container else next(iter(run.containers.values()))
        return c.proc.pid if c and c.proc and c.proc.returncode is None else None

    def log_path(self, namespace: str, name: str, container: str) -> Path:
        return self.work_dir / "pods" / f"{namespace}_{name}" / f"{container}.log"

    def log_tail(self, namespace: str, name: str, container: str, size: int = 3000) -> str:
        path = self.log_path(namespace, name, container)
        return path.read_text(errors="replace")[-size:] if path.exists() else "(no log)"

    # -- node --------------------------------------------------------------------------------
    async def _register_node(self) -> None:
        body = Node.from_dict(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": self.node, "labels": self.node_labels},
            }
        )
        try:
            await self.client.create(body)  # type: ignore[call-overload]
        except ApiError as exc:
            if exc.status.code != 409:
                raise
        resources = {"cpu": str(os.cpu_count() or 2), "memory": "16Gi", "pods": "110"}
        status = {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "process kubelet is posting ready status",
                        "lastHeartbeatTime": _now(),
                        "lastTransitionTime": _now(),
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": HOST_IP},
                    {"type": "Hostname", "address": self.node},
                ],
                "capacity": resources,
                "allocatable": resources,
                "nodeInfo": {
                    "architecture": "amd64",
                    "bootID": "",
                    "containerRuntimeVersion": "process://",
                    "kernelVersion": os.uname().release,
                    "kubeProxyVersion": "",
                    "kubeletVersion": "v1.35.4-process",
                    "machineID": "",
                    "operatingSystem": "linux",
                    "osImage": "process kubelet",
                    "systemUUID": "",
                },
            }
        }
        await self.client.patch(NodeStatus, self.node, status, patch_type=PatchType.MERGE)

    # -- watch -------------------------------------------------------------------------------
    async def _pods_loop(self) -> None:
        while True:
            try:
                listing = self.client.list(Pod, namespace=ALL_NS)
                pods = [p async for p in listing]
                seen = set()
                for pod in pods:
                    seen.add(pod.metadata.uid if pod.metadata else "")
                    await self._on_pod("ADDED", pod)
                for uid in [u for u in self.runs if u not in seen]:
                    self._on_deleted(uid)
                async for kind, pod in self.client.watch(
                    Pod, namespace=ALL_NS, resource_version=listing.resourceVersion
                ):
                    await self._on_pod(kind, pod)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("process kubelet: pod watch failed; listing again")
                await asyncio.sleep(0.5)

    async def _on_pod(self, kind: str, pod: Pod) -> None:
        data: dict[str, Any] = pod.to_dict()
        meta, spec = data.get("metadata", {}), data.get("spec", {})
        uid = meta.get("uid", "")
        if kind == "DELETED":
            self._on_deleted(uid)
            return
        node = spec.get("nodeName")
        if not node:
            if not meta.get("deletionTimestamp") and self._fits(spec):
                await self._bind(meta["namespace"], meta["name"])
            return
        if node != self.node:
            return
        run = self.runs.get(uid)
        if run is None:
            phase = data.get("status", {}).get("phase")
            if meta.get("deletionTimestamp"):
                await self._force_delete(meta["namespace"], meta["name"])  # nothing runs
            elif phase not in ("Succeeded", "Failed"):
                self._start_run(data)
            return
        run.pod = data
        if meta.get("deletionTimestamp"):
            run.deleting.set()

    def _on_deleted(self, uid: str) -> None:
        """Gone from the API (force-deleted, or our own final delete): stop what still runs."""
        run = self.runs.pop(uid, None)
        if run is None:
            return
        run.gone = True
        run.deleting.set()
        if run.task is not None and run.task.done():
            self._release(run)

    def _fits(self, spec: Mapping[str, Any]) -> bool:
        selector = spec.get("nodeSelector") or {}
        return all(self.node_labels.get(k) == v for k, v in selector.items())

    async def _bind(self, namespace: str, name: str) -> None:
        body = PodBinding.from_dict(
            {
                "metadata": {"name": name, "namespace": namespace},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
            }
        )
        try:
            await self.client.create(body, name, namespace=namespace)  # type: ignore[call-overload]
        except ApiError as exc:
            if exc.status.code not in (404, 409):  # gone or bound meanwhile
                raise
        except msgspec.ValidationError:
            pass  # bound: the apiserver answers with a Status, which lightkube cannot decode

    # -- one Pod -----------------------------------------------------------------------------
    def _start_run(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        run = _PodRun(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            ip="" if self.pod_network else self._allocate_ip(pod),
            pod=pod,
            dir=self.work_dir / "pods" / f"{meta['namespace']}_{meta['name']}",
        )
        run.dir.mkdir(parents=True, exist_ok=True)
        for spec in pod["spec"]["containers"]:
            run.containers[spec["name"]] = _Container(spec, run.dir / f"{spec['name']}.log")
        self.runs[run.uid] = run
        run.task = asyncio.create_task(self._run_pod(run), name=f"pod-{run.name}")

    def _allocate_ip(self, pod: Mapping[str, Any]) -> str:
        ports = [
            p["containerPort"]
            for c in pod["spec"]["containers"]
            for p in c.get("ports") or ()
            if p.get("containerPort")
        ]
        for _ in range(250 * 250):
            n, self._next_ip = self._next_ip, (self._next_ip + 1) % (250 * 250)
            ip = f"127.0.{1 + n // 250}.{2 + n % 250}"
            if ip not in self._ips and all(_port_free(ip, port) for port in ports):
                self._ips.add(ip)
                return ip
        raise RuntimeError("process kubelet: no free 127.0.x.y address")

    def _release(self, run: _PodRun) -> None:
        self._ips.discard(run.ip)

    async def _run_pod(self, run: _PodRun) -> None:
        try:
            await self._run_pod_inner(run)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("process kubelet: Pod %s/%s failed", run.namespace, run.name)

    async def _run_pod_inner(self, run: _PodRun) -> None:
        if self.pod_network:
            run.net = await k8s_podnet.make()
            run.ip = run.net.ip
            run.forwards = await k8s_podnet.forward_loopback(run.net, self.loopback_ports)
        if self.cri is not None:
            await self._cri_sandbox(run, create=True)
        workers = [
            asyncio.create_task(self._container_loop(run, c), name=f"ctr-{run.name}-{c.name}")
            for c in run.containers.values()
        ]
        try:
            await self._patch_status(run)
            await run.deleting.wait()
            spec = run.pod.get("spec", {})
            meta = run.pod.get("metadata", {})
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = spec.get("terminationGracePeriodSeconds", 30)
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await self._kill(run, grace=min(float(grace), self.kill_cap))
            if not run.gone:
                await self._force_delete(run.namespace, run.name)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if run.deleting.is_set() and self.cri is not None:
                await asyncio.shield(self._cri_sandbox(run, create=False))
            if run.deleting.is_set():
                await asyncio.shield(self._remove_net(run))
            if run.gone or run.uid not in self.runs:
                self._release(run)

    async def _remove_net(self, run: _PodRun) -> None:
        for server in run.forwards:
            server.close()
        run.forwards = []
        if run.net is not None:
            await k8s_podnet.remove(run.net)

    async def _cri_sandbox(self, run: _PodRun, *, create: bool) -> None:
        """Make (or remove) the Pod's CRI-style sandbox record (see the module docstring)."""
        assert self.cri is not None
        api = ContainerdApi(self.cri.socket, self.cri.namespace)
        sandbox_id = f"proc-sandbox-{run.uid}"
        try:
            if not create:
                with contextlib.suppress(FsbNotFound):
                    await api.delete_container(sandbox_id)
                return
            spec = {
                "ociVersion": "1.0.2",
                "linux": {
                    "namespaces": [
                        {"type": "pid"},
                        {
                            "type": "network",
                            "path": run.net.path if run.net else f"/proc/{os.getpid()}/ns/net",
                        },
                    ],
                    "cgroupsPath": f"{self.cri.cgroup_root}/pod{run.uid}/{sandbox_id}",
                },
            }
            record = pb.CtdContainer(
                id=sandbox_id,
                labels={
                    "io.cri-containerd.kind": "sandbox",
                    "io.kubernetes.pod.uid": run.uid,
                    "io.kubernetes.pod.name": run.name,
                    "io.kubernetes.pod.namespace": run.namespace,
                },
                runtime=pb.CtdContainer.Runtime(name="io.containerd.runc.v2"),
                spec=any_pb2.Any(
                    type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec",
                    value=json.dumps(spec).encode(),
                ),
            )
            with contextlib.suppress(FsbAlreadyExists):
                await api.create_container(record)
        finally:
            await api.close()

    async def _container_loop(self, run: _PodRun, c: _Container) -> None:
        backoff = 1.0
        policy = run.pod.get("spec", {}).get("restartPolicy", "Always")
        while True:
            try:
                argv, env, cwd = await self._prepare(run, c.spec)
            except (ConfigError, ApiError, httpx.HTTPError) as exc:
                c.waiting = {"reason": "CreateContainerConfigError", "message": str(exc)}
                await self._patch_status(run)
                await asyncio.sleep(1.0)
                continue
            with c.log.open("ab") as out:
                try:
                    c.proc = await asyncio.create_subprocess_exec(
                        *argv,
                        env=env,
                        cwd=cwd,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                        start_new_session=True,
                    )
                except OSError as exc:
                    c.waiting = {"reason": "RunContainerError", "message": str(exc)}
                    await self._patch_status(run)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
            began = time.monotonic()
            c.started_at, c.waiting, c.terminated = _now(), None, None
            probe = c.spec.get("readinessProbe")
            prober = asyncio.create_task(self._probe_loop(run, c, probe)) if probe else None
            c.ready = probe is None
            await self._patch_status(run)
            try:
                code = _exit_code(await c.proc.wait())
            finally:
                if prober is not None:
                    prober.cancel()
                    await asyncio.gather(prober, return_exceptions=True)
            c.ready = False
            term = {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": c.started_at,
                "finishedAt": _now(),
                "containerID": f"proc://{c.proc.pid}",
            }
            restart = policy == "Always" or (policy == "OnFailure" and code != 0)
            if run.deleting.is_set() or not restart:
                c.terminated = term
                await self._patch_status(run)
                return
            if time.monotonic() - began > MAX_BACKOFF:
                backoff = 1.0  # ran long enough: a new crash starts the backoff over
            c.last_terminated, c.restarts = term, c.restarts + 1
            c.waiting = {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {backoff:g}s restarting failed container",
            }
            await self._patch_status(run)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _probe_loop(self, run: _PodRun, c: _Container, probe: Mapping[str, Any]) -> None:
        tcp = probe.get("tcpSocket")
        if tcp is None:
            c.waiting = {"reason": "UnsupportedProbe", "message": "only tcpSocket probes run here"}
            await self._patch_status(run)
            return
        port = _port(c.spec, tcp["port"])
        host = tcp.get("host") or run.ip
        period = min(float(probe.get("periodSeconds", 10)), PROBE_PERIOD_CAP)
        timeout = float(probe.get("timeoutSeconds", 1))
        failures_allowed = int(probe.get("failureThreshold", 3))
        await asyncio.sleep(min(float(probe.get("initialDelaySeconds", 0)), PROBE_PERIOD_CAP))
        failures = 0
        while True:
            ok = await _tcp_ok(host, port, timeout)
            failures = 0 if ok else failures + 1
            ready = ok or (c.ready and failures < failures_allowed)
            if ready != c.ready:
                c.ready = ready
                await self._patch_status(run)
            await asyncio.sleep(period)

    async def _kill(self, run: _PodRun, grace: float) -> None:
        procs = [
            c.proc
            for c in run.containers.values()
            if c.proc is not None and c.proc.returncode is None
        ]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        waits = [asyncio.create_task(p.wait()) for p in procs]
        if waits:
            await asyncio.wait(waits, timeout=grace)
        for proc in procs:
            # The whole group: a container's children (e.g. `ctr pull`) go with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if waits:
            await asyncio.wait(waits, timeout=10)

    async def _force_delete(self, namespace: str, name: str) -> None:
        with contextlib.suppress(ApiError):
            await self.client.delete(Pod, name, namespace=namespace, grace_period=0)

    # -- container config --------------------------------------------------------------------
    async def _prepare(
        self, run: _PodRun, spec: Mapping[str, Any]
    ) -> tuple[list[str], dict[str, str], str | None]:
        """argv, environment and working dir of a container, or `ConfigError`."""
        await self._write_secret_volumes(run, spec)
        mounts = self._mounts(run, spec)
        env = await self._env(run, spec)
        command = [expand(a, env) for a in spec.get("command") or ()]
        args = [expand(a, env) for a in spec.get("args") or ()]
        # The image's entrypoint is a program of this host (the image table), not a path inside
        # the container: it is never rewritten, or a checkout under a mounted path such as /tmp
        # would be looked for inside the emptyDir.
        entrypoint: list[str] = []
        if not command:
            image = spec.get("image", "")
            entry = next((v for k, v in self.images.items() if fnmatch.fnmatch(image, k)), None)
            if entry is None:
                raise ConfigError(f"image {image!r} is not in the process kubelet's image table")
            entrypoint = list(entry)
        argv = entrypoint + [_rewrite(a, mounts) for a in command + args]
        if run.net is not None:
            # Into the Pod's namespace first (nsenter needs CAP_SYS_ADMIN), then bounded.
            argv = run.net.enter(_bounded(spec, argv))
        full = {**self.base_env, "HOSTNAME": run.name}
        full.update({k: _rewrite(v, mounts) for k, v in env.items()})
        cwd = spec.get("workingDir")
        return argv, full, _rewrite(cwd, mounts) if cwd else None

    def _mounts(self, run: _PodRun, spec: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(mountPath, local path) of the container's volume mounts, longest first."""
        volumes = {v["name"]: v for v in run.pod["spec"].get("volumes") or ()}
        out: list[tuple[str, str]] = []
        for mount in spec.get("volumeMounts") or ():
            volume = volumes.get(mount["name"])
            if volume is None:
                raise ConfigError(f"volumeMount {mount['name']!r} names no volume")
            if "hostPath" in volume:
                local = self._host_path(volume["hostPath"])
            elif "emptyDir" in volume or "secret" in volume:
                local = run.dir / "volumes" / volume["name"]
                local.mkdir(parents=True, exist_ok=True)
            else:
                raise ConfigError(
                    f"volume {volume['name']!r}: only hostPath, emptyDir and secret run here"
                )
            if mount.get("subPath"):
                local = local / mount["subPath"]
            out.append((mount["mountPath"].rstrip("/") or "/", str(local)))
        return sorted(out, key=lambda m: -len(m[0]))

    async def _write_secret_volumes(self, run: _PodRun, spec: Mapping[str, Any]) -> None:
        """A `secret` volume the container mounts: one file per key (`defaultMode`, else 0644),
        written afresh at each container start; a missing Secret is a `ConfigError` (retried)."""
        mounted = {m["name"] for m in spec.get("volumeMounts") or ()}
        for volume in run.pod["spec"].get("volumes") or ():
            source = volume.get("secret")
            if source is None or volume["name"] not in mounted:
                continue
            data = await self._object_data(
                Secret, run.namespace, source["secretName"], source.get("optional")
            )
            local = run.dir / "volumes" / volume["name"]
            local.mkdir(parents=True, exist_ok=True)
            mode = int(source.get("defaultMode", 0o644))
            for key, value in data.items():
                path = local / key
                path.unlink(missing_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(fd, "w") as out:
                    out.write(value)

    def _host_path(self, host_path: Mapping[str, Any]) -> Path:
        path = str(host_path["path"]).rstrip("/") or "/"
        for host, local in sorted(self.host_paths.items(), key=lambda kv: -len(kv[0])):
            if path == host or path.startswith(host + "/"):
                mapped = local / path[len(host) :].lstrip("/") if path != host else local
                if host_path.get("type") == "DirectoryOrCreate":
                    mapped.mkdir(parents=True, exist_ok=True)
                return mapped
        raise ConfigError(f"hostPath {path} is not mapped (kubelet_host_paths)")

    async def _env(self, run: _PodRun, spec: Mapping[str, Any]) -> dict[str, str]:
        namespace = run.namespace
        env: dict[str, str] = {}
        for source in spec.get("envFrom") or ():
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                ref = source["secretRef"]
                data = await self._object_data(Secret, namespace, ref["name"], ref.get("optional"))
            else:
                ref = source["configMapRef"]
                data = await self._object_data(
                    ConfigMap, namespace, ref["name"], ref.get("optional")
                )
            env.update({prefix + k: v for k, v in data.items()})
        for var in spec.get("env") or ():
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[name] = self._field(run, source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if secret else "configMapKeyRef"]
                data = await self._object_data(
                    Secret if secret else ConfigMap, namespace, ref["name"], ref.get("optional")
                )
                if ref["key"] in data:
                    env[name] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise ConfigError(f"couldn't find key {ref['key']} in {ref['name']}")
            else:
                raise ConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
        return env

    def _field(self, run: _PodRun, path: str) -> str:
        meta, spec = run.pod["metadata"], run.pod["spec"]
        simple = {
            "metadata.name": run.name,
            "metadata.namespace": run.namespace,
            "metadata.uid": run.uid,
            "spec.nodeName": self.node,
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.podIP": run.ip,
            "status.podIPs": run.ip,
            "status.hostIP": HOST_IP,
            "status.hostIPs": HOST_IP,
        }
        if path in simple:
            return str(simple[path])
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return str((meta.get(match[1]) or {}).get(match[2], ""))
        raise ConfigError(f"unsupported fieldRef {path}")

    async def _object_data(
        self, kind: type[Secret] | type[ConfigMap], namespace: str, name: str, optional: Any
    ) -> dict[str, str]:
        try:
            obj = await self.client.get(kind, name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404 and optional:
                return {}
            if exc.status.code == 404:
                raise ConfigError(f"{kind.__name__.lower()} {name!r} not found") from None
            raise
        if isinstance(obj, Secret):
            return {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}
        assert isinstance(obj, ConfigMap)
        return dict(obj.data or {})

    # -- status ------------------------------------------------------------------------------
    async def _patch_status(self, run: _PodRun) -> None:
        async with run.status_lock:
            if run.gone:
                return
            status = self._status(run)
            if status == run.last_status:
                return
            try:
                await self.client.patch(
                    PodStatus,
                    run.name,
                    {"status": status},
                    namespace=run.namespace,
                    patch_type=PatchType.MERGE,
                )
            except ApiError as exc:
                if exc.status.code == 404:
                    return
                raise
            run.last_status = status

    def _status(self, run: _PodRun) -> dict[str, Any]:
        statuses = []
        for c in run.containers.values():
            state: dict[str, Any]
            if c.terminated is not None:
                state = {"terminated": c.terminated}
            elif c.waiting is not None:
                state = {"waiting": c.waiting}
            else:
                state = {"running": {"startedAt": c.started_at}}
            entry: dict[str, Any] = {
                "name": c.name,
                "image": c.spec.get("image", ""),
                "imageID": f"process://{c.spec.get('image', '')}",
                "ready": c.ready,
                "started": "running" in state,
                "restartCount": c.restarts,
                "state": state,
            }
            if c.proc is not None:
                entry["containerID"] = f"proc://{c.proc.pid}"
            if c.last_terminated is not None:
                entry["lastState"] = {"terminated": c.last_terminated}
            statuses.append(entry)
        containers = list(run.containers.values())
        ready = all(c.ready for c in containers)
        if all(c.terminated is not None for c in containers):
            failed = any(c.terminated and c.terminated["exitCode"] != 0 for c in containers)
            phase = "Failed" if failed else "Succeeded"
        elif any(c.started_at for c in containers):
            phase = "Running"
        else:
            phase = "Pending"
        return {
            "phase": phase,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": run.start_time,
            "conditions": [
                run.condition("PodScheduled", True),
                run.condition("Initialized", True),
                run.condition("ContainersReady", ready),
                run.condition("Ready", ready),
            ],
            "containerStatuses": statuses,
        }

    # -- garbage collector -------------------------------------------------------------------
    async def _gc_loop(self) -> None:
        while True:
            try:
                await self.collect_garbage()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("process kubelet: garbage collection failed")
            await asyncio.sleep(self.gc_interval)

    async def collect_garbage(self) -> list[str]:
        """Delete the Pods none of whose owners exist any more; returns their names."""
        deleted = []
        async for pod in self.client.list(Pod, namespace=ALL_NS):
            meta = pod.metadata
            if meta is None or meta.deletionTimestamp or not meta.ownerReferences:
                continue
            namespace = meta.namespace or "default"
            alive = [await self._owner_exists(namespace, ref) for ref in meta.ownerReferences]
            if not any(alive):
                assert meta.name is not None
                log.info("process kubelet: garbage-collecting %s/%s", namespace, meta.name)
                with contextlib.suppress(ApiError):
                    await self.client.delete(Pod, meta.name, namespace=namespace)
                deleted.append(meta.name)
        return deleted

    async def _owner_exists(self, namespace: str, ref: Any) -> bool:
        kind: Any
        try:
            kind = resource_registry.load(ref.apiVersion, ref.kind)
        except Exception:
            group, _, version = ref.apiVersion.rpartition("/")
            plural = OWNER_PLURALS.get(ref.kind, ref.kind.lower() + "s")
            kind = create_namespaced_resource(group, version, ref.kind, plural)
        try:
            owner: Any = await self.client.get(kind, ref.name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return False
            raise
        return bool(owner.metadata and owner.metadata.uid == ref.uid)


def _port(spec: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in spec.get("ports") or ():
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ConfigError(f"probe names unknown port {port!r}")


def _rewrite(text: str, mounts: Sequence[tuple[str, str]]) -> str:
    """Replace each mount path (as a whole path prefix) by its local path, in one pass: a local
    path may itself start with another mount path (`/tmp/...` under a `/tmp` emptyDir)."""
    if not mounts:
        return text
    local = dict(mounts)
    alternatives = "|".join(re.escape(m) for m, _ in mounts)  # longest first: see `_mounts`
    pattern = r"(?<![\w.-])(" + alternatives + r")(?=/|$|[^\w.-])"
    return re.sub(pattern, lambda m: local[m[1]], text)


def _bounded(spec: Mapping[str, Any], argv: list[str]) -> list[str]:
    """`argv` with only the capabilities `securityContext.capabilities` leaves (drop ALL, add
    some: the only shape agent Pods use), and no_new_privs when privilege escalation is off."""
    context = spec.get("securityContext") or {}
    caps = context.get("capabilities") or {}
    if not caps:
        return argv
    if [c.upper() for c in caps.get("drop") or ()] != ["ALL"]:
        raise ConfigError("the process kubelet bounds capabilities only as drop: [ALL] + add")
    keep = "".join(f",+{c.lower()}" for c in caps.get("add") or ())
    wrap = ["setpriv", "--inh-caps=-all", f"--bounding-set=-all{keep}"]
    if context.get("allowPrivilegeEscalation") is False:
        wrap.append("--no-new-privs")
    return [*wrap, "--", *argv]


def _port_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


async def _tcp_ok(host: str, port: int, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def kubelet_images() -> dict[str, list[str]]:
    """Image pattern (fnmatch) → command. Override in a test module to run other images."""
    return {AGENT_IMAGE: list(AGENT_ARGV)}


@pytest.fixture
def kubelet_host_paths(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Path]:
    """hostPath → local path. The default gives agent Pods the test containerd's socket and a
    per-test state dir; override (or parametrize indirectly) for other Pods."""
    containerd = request.getfixturevalue("containerd")
    state = tmp_path / "host-state"
    state.mkdir(exist_ok=True)
    return {CONTAINERD_SOCKET: containerd.socket, STATE_ROOT: state}


@pytest.fixture
def kubelet_cri(request: pytest.FixtureRequest) -> CriEmulation | None:
    """Record CRI-style Pod sandboxes in the test containerd (None: don't)."""
    containerd = request.getfixturevalue("containerd")
    cgroup_parent: str = request.getfixturevalue("cgroup_parent")
    return CriEmulation(socket=containerd.socket, cgroup_root=f"{cgroup_parent}/kubepods")


@pytest.fixture
async def process_kubelet(
    kube_apiserver: Any,
    kubelet_images: dict[str, list[str]],
    kubelet_host_paths: dict[str, Path],
    kubelet_cri: CriEmulation | None,
    tmp_path: Path,
) -> AsyncIterator[ProcessKubelet]:
    """A Ready node `local-0` whose Pods run as local processes (see the module docstring)."""
    client = AsyncClient(config=KubeConfig.from_file(kube_apiserver.kubeconfig))
    kubelet = ProcessKubelet(
        client,
        images=kubelet_images,
        host_paths=kubelet_host_paths,
        work_dir=tmp_path / "kubelet",
        cri=kubelet_cri,
    )
    try:
        await kubelet.start()
        yield kubelet
    finally:
        await kubelet.stop()
        await client.close()
