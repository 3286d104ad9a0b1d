"""A pool's `agentTemplate` on a real kube-apiserver: the CRD refuses what the models refuse (a
privileged sidecar with the host's `/`, host namespaces, annotations), naming the field, for
`kubectl apply` as for any client; an allowed template (nodeSelector + tolerations) lands on the
agent Pod, which the fleet makes in the pool's own namespace only."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import ApiError, AsyncClient, Client
from lightkube.resources.core_v1 import Pod

from fastsandbox._kube.config import make_client
from fastsandbox._kube.resources import SandboxPoolResource, from_manifest
from fastsandbox.api.models import SandboxPool
from fastsandbox.fleet.kubernetes import KubernetesFleet
from tests.k8s_infra import KubeApiserverProc
from tests.k8s_kubelet import AGENT_IMAGE, ProcessKubelet

pytestmark = [pytest.mark.kubernetes, pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]

PRIVILEGED_SIDECAR: dict[str, Any] = {
    "spec": {
        "containers": [
            {"name": "agent"},
            {
                "name": "evil",
                "image": "busybox",
                "command": ["chroot", "/host", "sh"],
                "securityContext": {"privileged": True},
                "volumeMounts": [{"name": "root", "mountPath": "/host"}],
            },
        ],
        "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
        "hostPID": True,
    }
}


def pool_body(namespace: str, name: str, template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "fastsandbox.io/v1alpha1",
        "kind": "SandboxPool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"agentTemplate": template},
    }


@functools.cache
def kubectl_binary() -> str:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "build-kube-apiserver")],
        capture_output=True,
        text=True,
        timeout=45 * 60,
        check=True,
    )
    found = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return found["KUBECTL"]


def test_kubectl_apply_of_a_privileged_sidecar_is_refused_naming_the_fields(
    kube_crds: KubeApiserverProc, kube_admin: Client, kube_namespace: str
) -> None:
    body = yaml.safe_dump(pool_body(kube_namespace, "evil", PRIVILEGED_SIDECAR))
    proc = subprocess.run(
        [kubectl_binary(), "--kubeconfig", str(kube_crds.kubeconfig), "apply", "-f", "-"],
        input=body,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout
    said = proc.stderr
    # kubectl's default (strict) field validation names every field the schema does not have.
    assert "spec.agentTemplate.spec.volumes" in said, said
    assert "spec.agentTemplate.spec.hostPID" in said, said
    assert "spec.agentTemplate.spec.containers[1].image" in said, said
    assert "spec.agentTemplate.spec.containers[1].securityContext" in said, said
    with pytest.raises(ApiError):
        kube_admin.get(SandboxPoolResource, "evil", namespace=kube_namespace)

    # A client without strict validation: unknown fields are pruned, never stored, and the
    # sidecar's name alone (and the count of containers) is refused by the schema.
    with pytest.raises(ApiError) as info:
        kube_admin.create(
            SandboxPoolResource.from_dict(pool_body(kube_namespace, "evil", PRIVILEGED_SIDECAR))
        )
    assert info.value.status.code == 422
    message = str(info.value.status.message)
    assert "spec.agentTemplate.spec.containers" in message, message


@pytest.mark.parametrize(
    ("template", "field"),
    [
        ({"metadata": {"annotations": {"a": "b"}}}, "spec.agentTemplate.metadata.annotations"),
        ({"metadata": {"labels": {"x.io/y": "1"}}}, "spec.agentTemplate.metadata.labels"),
        ({"spec": {"hostNetwork": True}}, "spec.agentTemplate.spec.hostNetwork"),
        (
            {"spec": {"containers": [{"name": "agent", "image": "mine"}]}},
            "spec.agentTemplate.spec.containers[0].image",
        ),
    ],
)
def test_kubectl_apply_refuses_each_field_outside_the_allowlist(
    kube_crds: KubeApiserverProc, kube_namespace: str, template: dict[str, Any], field: str
) -> None:
    body = yaml.safe_dump(pool_body(kube_namespace, "bad", template))
    proc = subprocess.run(
        [kubectl_binary(), "--kubeconfig", str(kube_crds.kubeconfig), "apply", "-f", "-"],
        input=body,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0 and field in proc.stderr, proc.stderr


async def test_an_allowed_template_lands_on_the_agent_pod_in_the_pools_namespace(
    kube_crds: KubeApiserverProc,
    kube_admin: Client,
    kube_namespace: str,
    process_kubelet: ProcessKubelet,
) -> None:
    template = {
        "metadata": {"labels": {"team": "a"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "sandboxes", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "agent", "resources": {"limits": {"memory": "1Gi"}}}],
        },
    }
    created = kube_admin.create(
        SandboxPoolResource.from_dict(pool_body(kube_namespace, "placed", template))
    )
    pool = from_manifest(SandboxPool, created.to_dict())
    client: AsyncClient = await make_client(kube_crds.kubeconfig)
    # The controller's own namespace is another one: the agent still goes to the pool's.
    fleet = KubernetesFleet(client, agent_image=AGENT_IMAGE, namespace="default")
    try:
        handle = await fleet.start_agent(pool, "placed-aaaaa")
        assert handle.namespace == kube_namespace
        pod = await client.get(Pod, "placed-aaaaa", namespace=kube_namespace)
        assert pod.spec is not None and pod.metadata is not None
        assert pod.spec.nodeSelector == {"kubernetes.io/os": "linux"}
        # (The DefaultTolerationSeconds admission plugin adds the not-ready/unreachable ones.)
        tolerations = [(t.key, t.operator, t.effect) for t in pod.spec.tolerations or ()]
        assert ("sandboxes", "Exists", "NoSchedule") in tolerations
        assert (pod.metadata.labels or {})["team"] == "a"
        (agent,) = pod.spec.containers
        assert agent.resources is not None and agent.resources.limits == {"memory": "1Gi"}
        assert agent.securityContext is not None and agent.securityContext.privileged is False
        assert pod.spec.nodeName == "local-0"  # scheduled: the nodeSelector fits the node
        await fleet.stop_agent("placed-aaaaa")
    finally:
        await fleet.close()
        await client.close()
