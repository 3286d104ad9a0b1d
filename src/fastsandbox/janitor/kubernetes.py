"""The janitor as a DaemonSet: one per node, over that node's containerd (`fsb janitor --node`).

The same `Janitor` as the embedded server's, with what the cluster knows as its `KnownState`:

- live agents = the agent Pods bound to this node (label `app.kubernetes.io/name=fastsandbox-agent`,
  field `spec.nodeName`) that have not finished. A Pod being deleted still counts: its agent
  drains until the Pod is gone. The agent name on a container is its Pod's name.
- recorded containers = `status.containerID` of every Sandbox record, through the `ObjectStore`
  (the composition root passes `store.kubernetes.KubernetesStore`; this package never imports a
  Kubernetes store or the control plane).

Nothing is "in flight" here: the janitor sees no registry. A Fast-mode create writes its record a
few milliseconds after the container starts, far inside `orphan_timeout`, and the scanner forgets
an orphan as soon as a scan sees its record, so that gap never costs a sandbox.

containerd's `k8s.io` namespace is shared with the kubelet: the scanner only touches containers
with our agent label, and the snapshot sweep here only looks at keys shaped like our sandbox ids
(`<name>-<8 hex>`), never at CRI's 64-hex ids. If the apiserver cannot be read, the scan fails
and is retried: the janitor never acts on a partial view.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx2
from lightkube import ALL_NS, ApiError, AsyncClient
from lightkube.resources.core_v1 import Pod

from fastsandbox._aio.tasks import guarded
from fastsandbox._kube.errors import translate
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.api.models import Sandbox
from fastsandbox.janitor.containerd import ContainerdLeftovers
from fastsandbox.janitor.janitor import Janitor, Leftovers, SnapshotSeen
from fastsandbox.settings import CONTAINERD_SOCKET, JANITOR_INTERVAL_SECONDS, ORPHAN_TIMEOUT_SECONDS
from fastsandbox.store.base import ObjectStore

log = logging.getLogger(__name__)

AGENT_POD_LABEL = ("app.kubernetes.io/name", "fastsandbox-agent")
DEFAULT_CONTAINERD_NAMESPACE = "k8s.io"
DEFAULT_CONTAINERD_SOCKET = CONTAINERD_SOCKET
# Phases in which a Pod's containers have all stopped for good: its agent is gone.
_FINISHED = frozenset({"Succeeded", "Failed"})
# Our sandbox ids are `<name[:50]>-<8 hex>` (control.create_request); CRI's are 64 hex.
_OUR_SNAPSHOT_KEY = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?-[0-9a-f]{8}$")


@dataclass(frozen=True, slots=True)
class AgentPod:
    namespace: str
    name: str
    phase: str
    """The Pod's `status.phase` (Pending, Running, Succeeded, Failed, Unknown; "" when unset)."""


class AgentPods(Protocol):
    """The agent Pods scheduled to a node (`LightkubeAgentPods` over the API)."""

    async def on_node(self, node: str) -> list[AgentPod]: ...


def _agent_pod(pod: Pod) -> AgentPod:
    meta, status = pod.metadata, pod.status
    return AgentPod(
        namespace=(meta.namespace if meta else None) or "",
        name=(meta.name if meta else None) or "",
        phase=(status.phase if status else None) or "",
    )


class LightkubeAgentPods:
    """`AgentPods` over the apiserver: one list across namespaces (pools may be anywhere),
    narrowed by the server to our label and this node, so a big cluster costs one small reply."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def on_node(self, node: str) -> list[AgentPod]:
        try:
            return [
                _agent_pod(pod)
                async for pod in self.client.list(
                    Pod,
                    namespace=ALL_NS,
                    labels={AGENT_POD_LABEL[0]: AGENT_POD_LABEL[1]},
                    fields={"spec.nodeName": node},
                )
            ]
        except (ApiError, httpx2.HTTPError) as exc:
            raise translate(exc, f"the agent Pods of node {node}") from exc


class KubernetesKnownState:
    """`KnownState` from the apiserver, for the janitor of one node."""

    def __init__(self, store: ObjectStore, pods: AgentPods, node: str) -> None:
        if not node:
            raise ValueError("node name is required")
        self.store = store
        self.pods = pods
        self.node = node

    async def live_agents(self) -> set[str]:
        return {
            pod.name for pod in await self.pods.on_node(self.node) if pod.phase not in _FINISHED
        }

    async def recorded_container_ids(self) -> set[str]:
        return {
            sb.status.container_id
            for sb in await self.store.list(Sandbox)
            if sb.status.container_id
        }


class OurSnapshots:
    """`Leftovers` limited to snapshots keyed like our sandbox ids: the `k8s.io` namespace is
    the kubelet's too, and its snapshots are none of our business."""

    def __init__(self, inner: Leftovers) -> None:
        self.inner = inner

    async def log_paths(self) -> dict[str, str]:
        return await self.inner.log_paths()

    async def container_ids(self) -> set[str]:
        return await self.inner.container_ids()

    async def snapshots(self) -> list[SnapshotSeen]:
        return [s for s in await self.inner.snapshots() if _OUR_SNAPSHOT_KEY.match(s.key)]

    async def remove_snapshot(self, key: str) -> None:
        if not _OUR_SNAPSHOT_KEY.match(key):
            raise ValueError(f"refusing to remove snapshot {key!r}: not one of ours")
        await self.inner.remove_snapshot(key)


@dataclass(slots=True)
class NodeJanitorSettings:
    node: str
    """The node this janitor cleans (the DaemonSet passes `spec.nodeName`)."""
    containerd_socket: Path = DEFAULT_CONTAINERD_SOCKET
    """The node's containerd, mounted by hostPath."""
    containerd_namespace: str = DEFAULT_CONTAINERD_NAMESPACE
    """Where agent Pods make sandboxes: `k8s.io`, so they share the kubelet's image cache."""
    agents_dir: Path | None = None
    """The agents' host directory (`<dir>/<pod>/logs/<id>.log`); None skips the log sweep and
    leaves containers of agents gone before this janitor started to their labels alone."""
    interval_seconds: float = JANITOR_INTERVAL_SECONDS
    """Time between scans."""
    orphan_timeout_seconds: float = ORPHAN_TIMEOUT_SECONDS
    """How long a container stays orphaned before it is removed: far longer than the few ms
    between a Fast-mode start and its record."""


async def run(
    settings: NodeJanitorSettings,
    store: ObjectStore,
    pods: AgentPods,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event,
) -> None:
    """Scan the node until `stop` is set. The caller owns (and closes) `store` and `pods`."""
    known = KubernetesKnownState(store, pods, settings.node)
    runtime = ContainerdRuntime(settings.containerd_socket, settings.containerd_namespace)
    leftovers = ContainerdLeftovers(settings.containerd_socket, settings.containerd_namespace)
    janitor = Janitor(
        runtime,
        known,
        orphan_timeout=settings.orphan_timeout_seconds,
        interval=settings.interval_seconds,
        agents_dir=settings.agents_dir,
        leftovers=OurSnapshots(leftovers),
    )
    try:
        async with asyncio.TaskGroup() as group:
            # guarded: an unexpected error (not an FsbError, which `run` retries itself) restarts
            # the loop with backoff instead of ending the DaemonSet Pod.
            task = group.create_task(guarded("janitor", janitor.run), name="janitor")
            log.info(
                "janitor watching node",
                extra={"node": settings.node, "namespace": settings.containerd_namespace},
            )
            if ready is not None:
                ready.set()
            await stop.wait()
            task.cancel()
    finally:
        await leftovers.close()
        await runtime.close()
