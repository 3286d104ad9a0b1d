"""`KubernetesFleet` against a real kube-apiserver, with agent Pods run by the process kubelet.

One agent Pod goes through its whole life: created from a SandboxPool (owner, labels, its own
credentials Secret), served on its own podIP over TLS with its own token required, a real sandbox
made and removed in containerd namespace `k8s.io`, adopted by a second fleet, deleted by
`stop_agent` (Pod, process and Secret gone); then deleting the SandboxPool garbage-collects the
Pods it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import Pod, Secret

from fastsandbox._kube.config import make_client
from fastsandbox._kube.resources import SandboxPoolResource, from_manifest, to_manifest
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
from fastsandbox.api.models import ObjectMeta, SandboxPool, SandboxPoolSpec
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.errors import FsbError, Unauthenticated, Unavailable
from fastsandbox.fleet.kubernetes import AGENT_PORT, KubernetesFleet
from fastsandbox.fleet.kubernetes_credentials import CA_SECRET, credentials_secret
from tests.infra import ContainerdProc, RegistryProc
from tests.k8s_kubelet import AGENT_IMAGE, ProcessKubelet

pytestmark = [pytest.mark.kubernetes, pytest.mark.integration]

TIMEOUT = 60.0


async def eventually(
    what: str,
    check: Callable[[], Awaitable[Any]],
    timeout: float = TIMEOUT,
    context: Callable[[], str] = str,
) -> Any:
    """`check()`'s first truthy result, polled until `timeout`; `context()` explains a failure."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except FsbError as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(0.2)
    pytest.fail(f"{what} did not happen within {timeout:g}s (last: {last!r}){context()}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def pod_gone(client: AsyncClient, namespace: str, name: str) -> bool:
    try:
        await client.get(Pod, name, namespace=namespace)
    except ApiError as exc:
        return exc.status.code == 404
    return False


@pytest.fixture
async def kube(kube_apiserver: Any, kube_crds: Any) -> AsyncIterator[AsyncClient]:
    client = await make_client(kube_apiserver.kubeconfig)
    try:
        yield client
    finally:
        await client.close()


async def create_pool(client: AsyncClient, namespace: str, name: str, **spec: Any) -> SandboxPool:
    pool = SandboxPool(
        metadata=ObjectMeta(name=name, namespace=namespace), spec=SandboxPoolSpec(**spec)
    )
    created = await client.create(SandboxPoolResource.from_dict(to_manifest(pool)))
    return from_manifest(SandboxPool, created.to_dict())


async def test_agent_pod_lifecycle(
    kube: AsyncClient,
    kube_namespace: str,
    process_kubelet: ProcessKubelet,
    containerd: ContainerdProc,
    registry: RegistryProc,
    demo_image: str,
    cgroup_parent: str,
) -> None:
    ns = kube_namespace
    # Shared: this kubelet runs Pods in the test's own namespace, where an agent must not set
    # rules (private pools in Pods: tests/e2e/test_kube_private_network.py, `pod_network`).
    pool = await create_pool(
        kube, ns, "kpool", max_sandboxes_per_agent=2, agent_version="v1.2", network_mode="shared"
    )
    fleet = KubernetesFleet(
        kube,
        agent_image=AGENT_IMAGE,
        namespace=ns,
        watch_namespace=ns,
        insecure_registries=[registry.addr],
        grace_seconds=1,
        pod_grace_seconds=5,
        # The test's containerd keeps its state under its home, not /run/containerd: its shim
        # mounts each sandbox's size-limited layer in a bundle there (agent/runtime/disk.py).
        # Spelled through /proc/self/root (the same path for the shim) because the process
        # kubelet rewrites args under a Pod's mount paths, and the agent has `/tmp`.
        containerd_state=f"/proc/self/root{containerd.home / 'state'}",
    )
    await fleet.load_credentials()
    ca = await kube.get(Secret, CA_SECRET, namespace=ns)
    assert ca.data and {"ca.crt", "ca.key", "token-key"} <= set(ca.data)

    name = f"kpool-{uuid.uuid4().hex[:5]}"
    clients = AgentClients(auth=fleet.agent_auth)
    # The agent's CA and name, but no token or another agent's; and no TLS at all.
    tokenless = AgentClients(auth=lambda t: dataclasses.replace(fleet.agent_auth(t), token=None))
    foreign = AgentClients(
        auth=lambda t: dataclasses.replace(
            fleet.agent_auth(t), token=fleet.credentials.token(ns, "kpool-other")
        )
    )
    plaintext = AgentClients(token="anything")
    runtime = ContainerdRuntime(containerd.socket, "k8s.io", [registry.addr])
    sandbox_id = f"kube-it-{uuid.uuid4().hex[:6]}"
    try:
        handle = await fleet.start_agent(pool, name)
        assert handle.ip.startswith("127.0.")
        assert (handle.name, handle.pool, handle.namespace) == (name, "kpool", ns)
        assert (handle.target, handle.version) == (f"{handle.ip}:{AGENT_PORT}", "v1.2")

        pod = await kube.get(Pod, name, namespace=ns)
        assert pod.metadata is not None and pod.spec is not None
        assert pod.metadata.labels == {
            "app.kubernetes.io/name": "fastsandbox-agent",
            "fastsandbox.io/pool": "kpool",
            "fastsandbox.io/agent-version": "v1.2",
        }
        (owner,) = pod.metadata.ownerReferences or []
        assert (owner.kind, owner.name, owner.uid) == ("SandboxPool", "kpool", pool.metadata.uid)
        assert owner.controller and owner.blockOwnerDeletion
        assert pod.spec.nodeName == "local-0"

        # The agent answers on its podIP, with the token only.
        agent = clients.get(handle.target)
        status = await eventually(
            "agent Status",
            lambda: agent.status(timeout=2),
            context=lambda: "\nagent log:\n" + process_kubelet.log_tail(ns, name, "agent"),
        )
        assert (status.agent_name, status.pool, status.namespace) == (name, "kpool", ns)
        assert (status.agent_ip, status.capacity, status.version) == (handle.ip, 2, "v1.2")
        with pytest.raises(Unauthenticated, match="missing agent token"):
            await tokenless.get(handle.target).status()
        with pytest.raises(Unauthenticated, match="invalid agent token"):
            await foreign.get(handle.target).status()
        with pytest.raises(Unavailable):
            await plaintext.get(handle.target).status(timeout=5)
        # Its credentials are its own Secret, owned by the pool, mounted into its Pod only.
        creds = await kube.get(Secret, credentials_secret(name), namespace=ns)
        assert creds.metadata is not None and creds.data is not None
        assert set(creds.data) == {"tls.crt", "tls.key", "token"}
        (creds_owner,) = creds.metadata.ownerReferences or []
        assert (creds_owner.kind, creds_owner.uid) == ("SandboxPool", pool.metadata.uid)

        async def ready() -> bool:
            p = await kube.get(Pod, name, namespace=ns)
            conditions = (p.status.conditions or []) if p.status else []
            return any(c.type == "Ready" and c.status == "True" for c in conditions)

        await eventually("Pod Ready (tcpSocket probe)", ready)

        # A real sandbox, in the node's containerd namespace k8s.io.
        state = await agent.create(
            agent_pb2.SandboxRuntimeSpec(
                sandbox_id=sandbox_id,
                namespace=ns,
                name=sandbox_id,
                image=demo_image,
                command=["sh", "-c", "echo hello from k8s.io; exec sleep 300"],
            )
        )
        assert state.state == "running"
        assert sandbox_id in containerd.ctr("containers", "ls", "-q", namespace="k8s.io")
        # It joined "the Pod": the sandbox's network namespace and cgroup (agent/pod.py).
        info = json.loads(containerd.ctr("containers", "info", sandbox_id, namespace="k8s.io"))
        linux = info["Spec"]["linux"]
        assert {"type": "network", "path": f"/proc/{os.getpid()}/ns/net"} in linux["namespaces"]
        pod_cgroup = f"{cgroup_parent}/kubepods/pod{pod.metadata.uid}"
        assert linux["cgroupsPath"] == f"{pod_cgroup}/{name}/{sandbox_id}"
        assert f"{pod_cgroup}/{name}/{sandbox_id}" in Path(f"/proc/{state.pid}/cgroup").read_text()
        init_mounts = [m for m in info["Spec"]["mounts"] if m["destination"] == "/.fsb/init"]
        if init_mounts:  # fsb-init is built: copied into the host-visible state dir
            assert init_mounts[0]["source"].endswith(f"/agents/{name}/fsb-init")
            assert Path(init_mounts[0]["source"]).is_file()
        assert await agent.delete(sandbox_id, 1)
        assert sandbox_id not in containerd.ctr("containers", "ls", "-q", namespace="k8s.io")

        # Another fleet (a restarted controller) adopts the running Pod.
        other = KubernetesFleet(kube, agent_image=AGENT_IMAGE, namespace=ns, watch_namespace=ns)
        assert [h.name for h in await other.start()] == [name]
        assert [h.target for h in await other.agents()] == [handle.target]
        assert other.agent_auth(handle.target) == fleet.agent_auth(handle.target)
        await other.close()

        # A crashed agent is restarted in its Pod (restartPolicy Always), on the same podIP.
        crashed = process_kubelet.pid(ns, name)  # serving, so it runs
        assert crashed is not None
        os.kill(crashed, signal.SIGKILL)

        async def restarted() -> bool:
            p = await kube.get(Pod, name, namespace=ns)
            statuses = (p.status.containerStatuses or []) if p.status else []
            return [c.restartCount for c in statuses] == [1] and bool(await agent.status(timeout=2))

        await eventually("agent restarted in its Pod", restarted)
        assert (await kube.get(Pod, name, namespace=ns)).status.podIP == handle.ip  # type: ignore[union-attr]

        pid = process_kubelet.pid(ns, name)
        assert pid is not None and pid != crashed and process_alive(pid)
        await fleet.stop_agent(name)
        assert await pod_gone(kube, ns, name)
        assert not process_alive(pid)
        assert await fleet.agents() == []
        with pytest.raises(ApiError):
            await kube.get(Secret, credentials_secret(name), namespace=ns)
        pod_sandbox = f"proc-sandbox-{pod.metadata.uid}"
        assert pod_sandbox not in containerd.ctr("containers", "ls", "-q", namespace="k8s.io")
    finally:
        with contextlib.suppress(Exception):
            await runtime.delete(sandbox_id, 0)
        await runtime.close()
        for each in (clients, tokenless, foreign, plaintext):
            await each.close()
        await fleet.close()


async def test_deleting_the_pool_collects_its_agent_pods(
    kube: AsyncClient, kube_namespace: str, process_kubelet: ProcessKubelet
) -> None:
    ns = kube_namespace
    pool = await create_pool(kube, ns, "gcpool")
    fleet = KubernetesFleet(kube, agent_image=AGENT_IMAGE, namespace=ns, watch_namespace=ns)
    try:
        handles = await asyncio.gather(
            fleet.start_agent(pool, "gcpool-aaaaa"), fleet.start_agent(pool, "gcpool-bbbbb")
        )

        # The podIP comes before the process, as with a real kubelet.
        async def running() -> list[int | None] | None:
            pids = [process_kubelet.pid(ns, h.name) for h in handles]
            return pids if all(pids) else None

        pids = await eventually("agent processes", running)
        assert {h.ip for h in handles} == {h.ip for h in await fleet.agents()}
        assert len({h.ip for h in handles}) == 2

        await kube.delete(SandboxPoolResource, "gcpool", namespace=ns)

        async def collected() -> bool:
            return all([await pod_gone(kube, ns, h.name) for h in handles])

        await eventually("agent Pods garbage-collected", collected)
        assert not any(process_alive(pid) for pid in pids if pid is not None)
    finally:
        await fleet.close()


async def test_fleet_replicas_agree_on_one_agent_ca(kube: AsyncClient, kube_namespace: str) -> None:
    ns = kube_namespace
    first, second = (
        KubernetesFleet(kube, agent_image=AGENT_IMAGE, namespace=ns, watch_namespace=ns)
        for _ in range(2)
    )
    # Both find no Secret and race to make it: one wins, the other reads the winner's.
    await asyncio.gather(first.load_credentials(), second.load_credentials())
    assert first.credentials.token(ns, "a1") == second.credentials.token(ns, "a1")
    assert first.credentials.token(ns, "a1") != first.credentials.token(ns, "a2")
    assert first.credentials.auth(ns, "a1").root_ca == second.credentials.auth(ns, "a1").root_ca


async def test_start_clears_agent_pods_that_ended_or_never_started(
    kube: AsyncClient, kube_namespace: str, process_kubelet: ProcessKubelet
) -> None:
    ns = kube_namespace
    labels = {"app.kubernetes.io/name": "fastsandbox-agent", "fastsandbox.io/pool": "old"}

    def pod(name: str, **spec: Any) -> Pod:
        container = {"name": "agent", "image": AGENT_IMAGE, "command": ["false"]}
        return Pod.from_dict(
            {
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"containers": [container], **spec},
            }
        )

    await kube.create(pod("old-failed", restartPolicy="Never"))
    await kube.create(pod("old-unschedulable", nodeSelector={"nowhere": "true"}))

    async def failed() -> bool:
        p = await kube.get(Pod, "old-failed", namespace=ns)
        return bool(p.status and p.status.phase == "Failed")

    await eventually("the Pod failed", failed)
    await asyncio.sleep(1.0)  # older than the fleet's start timeout below
    fleet = KubernetesFleet(
        kube, agent_image=AGENT_IMAGE, namespace=ns, watch_namespace=ns, start_timeout=0.5
    )
    assert await fleet.start() == []
    for name in ("old-failed", "old-unschedulable"):
        await eventually(f"{name} deleted", lambda name=name: pod_gone(kube, ns, name))
