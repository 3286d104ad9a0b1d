"""`fsb janitor --node` (the DaemonSet mode) against a real kube-apiserver and a real containerd.

Agent Pods are plain Pod objects bound to a made-up node (nothing runs them; the janitor only
reads them); sandbox records are real Sandbox objects. The janitor runs as the real command,
against the session's containerd in a namespace of this test, and must remove the container
without a record and the one whose agent Pod finished, keep the recorded one, and leave alone
containers that are not ours.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lightkube import Client
from lightkube.models.core_v1 import Container, PodSpec
from lightkube.models.meta_v1 import ObjectMeta as KubeMeta
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

from fastsandbox.agent.runtime.base import ContainerSpec, ContainerStatus
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.api.models import ObjectMeta, Sandbox, SandboxSpec
from fastsandbox.errors import NotFound
from fastsandbox.janitor.kubernetes import (
    AGENT_POD_LABEL,
    KubernetesKnownState,
    LightkubeAgentPods,
)
from fastsandbox.janitor.scanner import AGENT_LABEL
from tests.infra import ContainerdProc
from tests.k8s_infra import KubeApiserverProc

pytestmark = [pytest.mark.kubernetes, pytest.mark.integration, pytest.mark.timeout(300)]


def agent_pod(namespace: str, name: str, node: str, labelled: bool = True) -> Pod:
    labels = {AGENT_POD_LABEL[0]: AGENT_POD_LABEL[1]} if labelled else {"app": "other"}
    return Pod(
        metadata=KubeMeta(name=name, namespace=namespace, labels=labels),
        spec=PodSpec(nodeName=node, containers=[Container(name="agent", image="fsb")]),
    )


def set_phase(admin: Client, namespace: str, name: str, phase: str) -> None:
    """What the kubelet would write when the agent's container ends."""
    admin.patch(
        Pod.Status,
        name,
        {"status": {"phase": phase}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )


@pytest.fixture
async def runtime(
    containerd: ContainerdProc, demo_image: str, tmp_path: Path
) -> AsyncIterator[tuple[ContainerdRuntime, str]]:
    namespace = f"fsbjan-{secrets.token_hex(3)}"
    rt = ContainerdRuntime(
        containerd.socket, namespace, [demo_image.split("/", 1)[0]], state_dir=tmp_path / "rt"
    )
    await rt.pull(demo_image)
    try:
        yield rt, namespace
    finally:
        for state in await rt.list():
            await rt.delete(state.id, 0)
        await rt.close()


async def test_known_state_reads_agent_pods_of_its_node_and_every_record(
    kube_crds: KubeApiserverProc, kube_admin: Client, kube_namespace: str
) -> None:
    from fastsandbox._kube.config import make_client
    from fastsandbox.store.kubernetes import KubernetesStore

    node = f"node-{secrets.token_hex(3)}"
    for pod in (
        agent_pod(kube_namespace, "pool-aaaaa", node),
        agent_pod(kube_namespace, "pool-bbbbb", node),
        agent_pod(kube_namespace, "pool-ccccc", "another-node"),
        agent_pod(kube_namespace, "not-an-agent", node, labelled=False),
    ):
        kube_admin.create(pod)
    set_phase(kube_admin, kube_namespace, "pool-bbbbb", "Failed")

    store = await KubernetesStore.open(kube_crds.kubeconfig)
    client = await make_client(kube_crds.kubeconfig)
    try:
        sb = await store.create(
            Sandbox(
                metadata=ObjectMeta(name="rec", namespace=kube_namespace),
                spec=SandboxSpec(image="busybox", pool_ref="pool"),
            )
        )
        sb.status.container_id = "rec-0000aaaa"
        await store.update_status(sb)
        state = KubernetesKnownState(store, LightkubeAgentPods(client), node)
        assert await state.live_agents() == {"pool-aaaaa"}
        assert "rec-0000aaaa" in await state.recorded_container_ids()
    finally:
        await client.close()
        await store.close()


async def test_fsb_janitor_cleans_its_node(
    kube_crds: KubeApiserverProc,
    kube_admin: Client,
    kube_namespace: str,
    runtime: tuple[ContainerdRuntime, str],
    containerd: ContainerdProc,
    demo_image: str,
    cgroup_parent: str,
    tmp_path: Path,
) -> None:
    from fastsandbox.store.kubernetes import KubernetesStore

    rt, ctr_namespace = runtime
    tag = secrets.token_hex(4)
    node = f"node-{tag}"
    live, finishing = f"pool-l{tag[:4]}", f"pool-f{tag[:4]}"
    kube_admin.create(agent_pod(kube_namespace, live, node))
    kube_admin.create(agent_pod(kube_namespace, finishing, node))
    agents_dir = tmp_path / "agents"

    ids = {
        "recorded": f"rec-{tag}",
        "stray": f"stray-{tag}",
        "dead": f"dead-{tag}",
        "foreign": f"foreign-{tag}",
    }
    owners = {
        "recorded": live,
        "stray": live,
        "dead": finishing,
        "foreign": "someone-else",
    }
    for what, cid in ids.items():
        # Only our agents' logs are under agents_dir; the foreign one logs elsewhere.
        log_dir = (agents_dir / owners[what] if what != "foreign" else tmp_path / "x") / "logs"
        await rt.create(
            ContainerSpec(
                id=cid,
                image=demo_image,
                log_path=str(log_dir / f"{cid}.log"),
                command=("sleep", "300"),
                labels={AGENT_LABEL: owners[what]},
                cgroup_parent=cgroup_parent,
            )
        )

    store = await KubernetesStore.open(kube_crds.kubeconfig)
    try:
        sb = await store.create(
            Sandbox(
                metadata=ObjectMeta(name="kept", namespace=kube_namespace),
                spec=SandboxSpec(image=demo_image, pool_ref="pool"),
            )
        )
        sb.status.container_id = ids["recorded"]
        await store.update_status(sb)
    finally:
        await store.close()

    # The agent of `finishing` is gone: its Pod failed.
    set_phase(kube_admin, kube_namespace, finishing, "Failed")
    argv = [
        sys.executable, "-m", "fastsandbox.cli.main", "janitor", "--node", node,
        "--kubeconfig", str(kube_crds.kubeconfig),
        "--containerd-socket", str(containerd.socket),
        "--containerd-namespace", ctr_namespace,
        "--agents-dir", str(agents_dir),
        "--orphan-timeout", "1", "--interval", "0.3", "--log-format", "json",
    ]  # fmt: skip
    log_path = tmp_path / "janitor.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "KUBECONFIG": ""}
        )
    try:

        async def remaining() -> set[str]:
            return {s.id for s in await rt.list()}

        async with asyncio.timeout(60):
            while {ids["stray"], ids["dead"]} & await remaining():
                assert proc.returncode is None, log_path.read_text()[-3000:]
                await asyncio.sleep(0.2)
        # A few more scans: nothing else goes.
        await asyncio.sleep(1.5)
        assert await remaining() == {ids["recorded"], ids["foreign"]}
        assert (await rt.get(ids["recorded"])).status is ContainerStatus.RUNNING
        with pytest.raises(NotFound):
            await rt.get(ids["stray"])
        text = log_path.read_text()
        assert "removed orphan container" in text
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert code == 0, log_path.read_text()[-3000:]
