"""The Kubernetes fleet: every agent is a Pod, owned by its SandboxPool.

One Pod per agent, named by the caller (`PoolManager` picks `<pool>-<random>`), in the pool's
namespace (an ownerReference cannot cross namespaces). The agent serves its gRPC API on
`$(POD_IP):7443` over TLS and requires a bearer token of its own: before each Pod the fleet writes
Secret `<pod>-credentials` (a certificate from the controller's agent CA and the agent's token,
`kubernetes_credentials.py`), and the control plane's `AgentClients` asks `fleet.agent_auth` for
each agent's token, the CA and the name its certificate must carry.

What behaves differently from the embedded fleet, and why:
- Restarts are the kubelet's job (`restartPolicy: Always`); the Pod keeps its IP across them, so
  the handle stays valid and the control plane just sees the agent unready for a moment.
- `close()` leaves the Pods running. They are cluster state, not children of this process: the
  next controller (another replica after a failover, or this one restarted) adopts them in
  `start()`, and their sandboxes never notice.
- `start()` adopts every agent Pod it finds (label `app.kubernetes.io/name=fastsandbox-agent`) that
  has an IP, without waiting for any; Pods that finished (evicted, failed) or have had no IP for
  longer than `start_timeout` are deleted, as the pool loop would stop such an agent anyway.
- Drain, surge and rolling updates are decided by `PoolManager` exactly as embedded; the fleet
  only starts Pods with the pool's `agentVersion` (label + `--version`) and deletes them.

The agent container runs in the node's containerd namespace `k8s.io` (the node's image cache).
Paths the agent hands to containerd are resolved by containerd and the runc shim on the *host*,
not in the Pod: sandbox log files, and the `fsb-init` binary bind-mounted into every sandbox.
So the agent's state lives on a hostPath mounted at the same path inside the Pod, where host and
agent see the same files, and the agent is started with `--pod-uid`: it finds its Pod's CRI
sandbox in containerd and makes its sandboxes join the Pod's network namespace and cgroup
(`agent/pod.py`), so their endpoints are `podIP:port` and the Pod's resources bound them.

What the Pod is (the pure manifest) lives in `kubernetes_manifest.py`; this module is its
lifecycle: the credentials Secret, create, wait for an IP, adopt, delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

import httpx2 as httpx
from lightkube import ALL_NS, ApiError, AsyncClient
from lightkube.resources.core_v1 import Pod

from fastsandbox._kube.config import FIELD_MANAGER
from fastsandbox._kube.errors import translate
from fastsandbox.api.models import SandboxPool
from fastsandbox.errors import (
    AlreadyExists,
    FsbError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from fastsandbox.fleet.base import AgentAuth, AgentHandle
from fastsandbox.fleet.kubernetes_credentials import AgentCredentials
from fastsandbox.fleet.kubernetes_manifest import (
    AGENT_PORT,
    APP_LABEL,
    APP_NAME,
    POOL_LABEL,
    VERSION_ANNOTATION,
    VERSION_LABEL,
    AgentPodSpec,
    pod_manifest,
)
from fastsandbox.fleet.warm_limits import DEFAULT_CPU, DEFAULT_MEMORY
from fastsandbox.settings import DELETE_GRACE_SECONDS, LogSettings

log = logging.getLogger(__name__)


class KubernetesFleet:
    """`AgentFleet` on a Kubernetes API server (see the module docstring).

    `client` is owned by the caller (the composition root closes it). `namespace` is the
    controller's own namespace, where the token Secret is read or made first; `watch_namespace`
    limits adoption to one namespace (None: every namespace).
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        agent_image: str,
        namespace: str = "default",
        watch_namespace: str | None = None,
        containerd_namespace: str = "k8s.io",
        insecure_registries: Sequence[str] = (),
        grace_seconds: float = DELETE_GRACE_SECONDS,
        pod_grace_seconds: int = 30,
        start_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        image_pull_policy: str = "IfNotPresent",
        log: LogSettings | None = None,
        default_cpu: str = DEFAULT_CPU,
        default_memory: str = DEFAULT_MEMORY,
    ) -> None:
        self.client = client
        self.default_limits = (default_cpu, default_memory)
        self.agent_image = agent_image
        self.namespace = namespace
        self.watch_namespace = watch_namespace
        self.containerd_namespace = containerd_namespace
        self.insecure_registries = list(insecure_registries)
        self.grace_seconds = grace_seconds
        self.pod_grace_seconds = pod_grace_seconds
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.image_pull_policy = image_pull_policy
        self.log_settings = log or LogSettings()
        self.credentials = AgentCredentials(client, namespace)
        self._agents: dict[str, AgentHandle] = {}

    # -- credentials -------------------------------------------------------------------------
    async def load_credentials(self) -> None:
        """Read (or make) the agent CA and token key: before any channel to an agent is made."""
        await self.credentials.load()

    def agent_auth(self, target: str) -> AgentAuth:
        """`AgentAuthFor` for the control plane's `AgentClients`: the credentials of the agent
        Pod serving at `target`. An address no agent Pod of ours has is refused (fail closed)."""
        for handle in self._agents.values():
            if handle.target == target:
                return self.credentials.auth(handle.namespace, handle.name)
        raise Unavailable(f"no agent Pod of this fleet serves at {target}")

    # -- AgentFleet --------------------------------------------------------------------------
    async def start(self) -> list[AgentHandle]:
        await self.credentials.load()
        now = time.time()
        # Terminating Pods are on their way out: not adopted.
        for pod in [p for p in await self._list_agent_pods() if not _deleting(p)]:
            if _pod_ip(pod) and not _finished(pod):
                self._remember(pod)
            elif _finished(pod) or now - _created(pod) > self.start_timeout:
                log.warning(
                    "deleting an agent Pod that ended or never started",
                    extra={"agent": _name(pod), "why": _why(pod)},
                )
                await self._delete(_namespace(pod), _name(pod), grace=0)
            # Else still starting (a previous controller's start): not waited for here, so a
            # pending Pod never delays serving; `agents()` lists it once it has its IP.
        log.info("adopted agent Pods", extra={"agents": sorted(self._agents)})
        return list(self._agents.values())

    async def start_agent(self, pool: SandboxPool, name: str) -> AgentHandle:
        ns = pool.metadata.namespace
        if not pool.metadata.uid:
            raise InvalidArgument(
                f"pool {ns}/{pool.metadata.name} has no uid: the Kubernetes fleet needs pools "
                "stored in Kubernetes (the Pod's ownerReference names the pool's uid)"
            )
        if self.watch_namespace and ns != self.watch_namespace:
            raise InvalidArgument(
                f"pool {ns}/{pool.metadata.name}: this controller runs agents only in namespace "
                f"{self.watch_namespace} (--watch-namespace)"
            )
        manifest = self.pod_manifest(pool, name)
        if manifest["metadata"].get("namespace") != ns:
            # By construction today; checked so that no template or merge change can ever place
            # a pool's agent (and the containerd socket it mounts) in someone else's namespace.
            raise InvalidArgument(
                f"agent Pod {name} of pool {ns}/{pool.metadata.name}: wrong namespace"
            )
        await self.credentials.load()
        await self.credentials.create_secret(pool, name)
        try:
            created = await self.client.create(
                cast(Pod, Pod.from_dict(manifest)), field_manager=FIELD_MANAGER
            )
        except ApiError as exc:
            if exc.status.code != 409 or exc.status.reason != "AlreadyExists":
                raise translate(exc, f"creating agent Pod {ns}/{name}") from None
            created = await self._get(ns, name)  # a retried start: share the first one's Pod
            if _labels(created).get(POOL_LABEL) != pool.metadata.name:
                raise AlreadyExists(
                    f"Pod {ns}/{name} exists and is not an agent of this pool"
                ) from None
        except httpx.HTTPError as exc:
            raise translate(exc, f"creating agent Pod {ns}/{name}") from None
        log.info("agent Pod created", extra={"agent": name, "pool": f"{ns}/{pool.metadata.name}"})
        try:
            pod = await self._wait_ip(ns, name, created)
        except FsbError:
            # Never registered, so nothing else would ever delete it (nor its Secret).
            with contextlib.suppress(FsbError):
                await asyncio.shield(self._delete(ns, name, grace=0))
            with contextlib.suppress(FsbError):
                await asyncio.shield(self.credentials.delete_secret(ns, name))
            raise
        return self._remember(pod)

    async def stop_agent(self, name: str) -> None:
        handle = self._agents.get(name)
        namespace = handle.namespace if handle else await self._find_namespace(name)
        if namespace is None:
            return  # gone already
        try:
            await self._delete(namespace, name)
            await self._wait_gone(namespace, name)
            await self.credentials.delete_secret(namespace, name)
        finally:
            self._agents.pop(name, None)
        log.info("agent Pod deleted", extra={"agent": name, "namespace": namespace})

    async def agents(self) -> list[AgentHandle]:
        live: dict[str, AgentHandle] = {}
        for pod in await self._list_agent_pods():
            if _pod_ip(pod) and not _finished(pod) and not _deleting(pod):
                live[_name(pod)] = self._handle(pod)
        self._agents = live
        return list(live.values())

    async def close(self) -> None:
        """Forget the agents but leave their Pods running (see the module docstring)."""
        self._agents.clear()

    # -- the Pod -----------------------------------------------------------------------------
    def pod_manifest(self, pool: SandboxPool, name: str) -> dict[str, Any]:
        """The agent Pod for `pool` (pure: no API calls), the pool's `agentTemplate` merged."""
        spec = AgentPodSpec(
            agent_image=self.agent_image,
            containerd_namespace=self.containerd_namespace,
            insecure_registries=tuple(self.insecure_registries),
            grace_seconds=self.grace_seconds,
            pod_grace_seconds=self.pod_grace_seconds,
            image_pull_policy=self.image_pull_policy,
            log=self.log_settings,
            default_cpu=self.default_limits[0],
            default_memory=self.default_limits[1],
        )
        return pod_manifest(pool, name, spec)

    # -- API helpers -------------------------------------------------------------------------
    def _handle(self, pod: Pod) -> AgentHandle:
        ip = _pod_ip(pod)
        meta = pod.metadata
        assert meta is not None
        annotations = meta.annotations or {}
        labels = meta.labels or {}
        return AgentHandle(
            name=_name(pod),
            pool=labels.get(POOL_LABEL, ""),
            namespace=_namespace(pod),
            target=f"[{ip}]:{AGENT_PORT}" if ":" in ip else f"{ip}:{AGENT_PORT}",
            ip=ip,
            version=annotations.get(VERSION_ANNOTATION, labels.get(VERSION_LABEL, "")),
        )

    def _remember(self, pod: Pod) -> AgentHandle:
        handle = self._handle(pod)
        self._agents[handle.name] = handle
        return handle

    async def _list_agent_pods(self) -> list[Pod]:
        try:
            return [
                p
                async for p in self.client.list(
                    Pod,
                    namespace=self.watch_namespace or ALL_NS,
                    labels={APP_LABEL: APP_NAME},
                )
            ]
        except (ApiError, httpx.HTTPError) as exc:
            raise translate(exc, "listing agent Pods") from None

    async def _get(self, namespace: str, name: str) -> Pod:
        try:
            return await self.client.get(Pod, name, namespace=namespace)
        except (ApiError, httpx.HTTPError) as exc:
            raise translate(exc, f"agent Pod {namespace}/{name}") from None

    async def _find_namespace(self, name: str) -> str | None:
        try:
            pods = [
                p
                async for p in self.client.list(
                    Pod,
                    namespace=self.watch_namespace or ALL_NS,
                    labels={APP_LABEL: APP_NAME},
                    fields={"metadata.name": name},
                )
            ]
        except (ApiError, httpx.HTTPError) as exc:
            raise translate(exc, f"finding agent Pod {name}") from None
        return _namespace(pods[0]) if pods else None

    async def _delete(self, namespace: str, name: str, grace: int | None = None) -> None:
        try:
            await self.client.delete(Pod, name, namespace=namespace, grace_period=grace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise translate(exc, f"deleting agent Pod {namespace}/{name}") from None
        except httpx.HTTPError as exc:
            raise translate(exc, f"deleting agent Pod {namespace}/{name}") from None

    async def _wait_ip(self, namespace: str, name: str, pod: Pod | None = None) -> Pod:
        """The Pod once it has an IP; `Unavailable` when it finishes or `start_timeout` passes."""
        deadline = time.monotonic() + self.start_timeout
        what = f"agent Pod {namespace}/{name}"
        try:
            async with asyncio.timeout(self.start_timeout):
                while True:
                    if pod is None:
                        pod = await self._get(namespace, name)
                    if _deleting(pod) or _finished(pod):
                        raise Unavailable(f"{what} ended before it got an IP: {_why(pod)}")
                    if _pod_ip(pod):
                        return pod
                    pod = await self._next_change(namespace, name, pod, deadline)
        except TimeoutError:
            raise Unavailable(
                f"{what} got no IP within {self.start_timeout:g}s (unschedulable, image pull, "
                f"or no kubelet?): {_why(pod) if pod else 'not found'}"
            ) from None

    async def _wait_gone(self, namespace: str, name: str) -> None:
        deadline = time.monotonic() + self.stop_timeout
        pod: Pod | None = None
        try:
            async with asyncio.timeout(self.stop_timeout):
                while True:
                    try:
                        pod = await self._get(namespace, name) if pod is None else pod
                    except NotFound:
                        return
                    pod = await self._next_change(namespace, name, pod, deadline)
        except TimeoutError:
            log.warning(
                "agent Pod still terminating", extra={"agent": name, "seconds": self.stop_timeout}
            )
        except NotFound:
            return

    async def _next_change(self, namespace: str, name: str, pod: Pod, deadline: float) -> Pod:
        """Wait (watch) for the next version of `pod`; `NotFound` once it is deleted. A broken or
        expired watch falls back to a fresh GET."""
        rv = pod.metadata.resourceVersion if pod.metadata else None
        timeout = max(int(deadline - time.monotonic()) + 1, 1)
        try:
            async for kind, obj in self.client.watch(
                Pod,
                namespace=namespace,
                fields={"metadata.name": name},
                resource_version=rv,
                server_timeout=timeout,
            ):
                if kind == "DELETED":
                    raise NotFound(f"agent Pod {namespace}/{name} was deleted")
                return obj
        except ApiError as exc:
            if exc.status.code != 410:  # 410: our version is too old; GET afresh
                raise translate(exc, f"watching agent Pod {namespace}/{name}") from None
        except httpx.HTTPError:
            await asyncio.sleep(0.2)  # a broken watch: GET afresh after a breath
        return await self._get(namespace, name)


def _name(pod: Pod) -> str:
    assert pod.metadata is not None and pod.metadata.name is not None
    return pod.metadata.name


def _namespace(pod: Pod) -> str:
    assert pod.metadata is not None and pod.metadata.namespace is not None
    return pod.metadata.namespace


def _labels(pod: Pod) -> dict[str, str]:
    return dict(pod.metadata.labels or {}) if pod.metadata else {}


def _pod_ip(pod: Pod) -> str:
    return (pod.status.podIP if pod.status else None) or ""


def _finished(pod: Pod) -> bool:
    return bool(pod.status and pod.status.phase in ("Succeeded", "Failed"))


def _created(pod: Pod) -> float:
    stamp = pod.metadata.creationTimestamp if pod.metadata else None
    return stamp.timestamp() if stamp else time.time()


def _deleting(pod: Pod) -> bool:
    return bool(pod.metadata and pod.metadata.deletionTimestamp)


def _why(pod: Pod) -> str:
    """A short account of where the Pod is stuck, from its status."""
    status = pod.status
    if status is None:
        return "no status yet (not scheduled)"
    parts = [f"phase {status.phase or 'Pending'}"]
    for cond in status.conditions or ():
        if cond.status != "True" and cond.reason:
            parts.append(f"{cond.type}={cond.reason}: {cond.message or ''}".rstrip(": "))
    for cs in status.containerStatuses or ():
        state = cs.state
        if state and state.waiting and state.waiting.reason:
            parts.append(f"{cs.name} waiting: {state.waiting.reason} {state.waiting.message or ''}")
        if state and state.terminated:
            parts.append(f"{cs.name} exited {state.terminated.exitCode}")
    if status.message:
        parts.append(status.message)
    return "; ".join(p.strip() for p in parts)
