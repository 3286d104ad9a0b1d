"""A pool's `agentTemplate` is an allowlist: anything that could make an agent Pod more than a
placed, sized agent is refused naming the field (the Fast-Path, `fsb apply`, and the CRD)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from fastsandbox.api.crds import crd_manifest
from fastsandbox.api.models import SandboxPool, describe_validation_error

PRIVILEGED_SIDECAR: dict[str, Any] = {
    "spec": {
        "containers": [
            {"name": "agent"},
            {
                "name": "evil",
                "image": "busybox",
                "command": ["chroot", "/host"],
                "securityContext": {"privileged": True},
                "volumeMounts": [{"name": "root", "mountPath": "/host"}],
            },
        ],
        "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
    }
}


def refusal(template: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        SandboxPool.model_validate({"metadata": {"name": "p"}, "spec": {"agentTemplate": template}})
    return describe_validation_error(info.value)


def test_a_privileged_sidecar_with_the_hosts_root_is_refused_naming_the_fields() -> None:
    said = refusal(PRIVILEGED_SIDECAR)
    assert "spec.agentTemplate.spec.containers[1].name: only the agent container" in said
    assert "spec.agentTemplate.spec.containers[1].securityContext: not allowed" in said
    assert "spec.agentTemplate.spec.containers[1].volumeMounts: not allowed" in said
    assert "spec.agentTemplate.spec.volumes: not allowed" in said


@pytest.mark.parametrize(
    ("template", "field"),
    [
        ({"spec": {"hostNetwork": True}}, "spec.agentTemplate.spec.hostNetwork"),
        ({"spec": {"hostPID": True}}, "spec.agentTemplate.spec.hostPID"),
        ({"spec": {"hostIPC": True}}, "spec.agentTemplate.spec.hostIPC"),
        ({"spec": {"serviceAccountName": "admin"}}, "spec.agentTemplate.spec.serviceAccountName"),
        ({"spec": {"securityContext": {}}}, "spec.agentTemplate.spec.securityContext"),
        ({"spec": {"initContainers": []}}, "spec.agentTemplate.spec.initContainers"),
        ({"spec": {"runtimeClassName": "x"}}, "spec.agentTemplate.spec.runtimeClassName"),
        ({"spec": {"nodeName": "n1"}}, "spec.agentTemplate.spec.nodeName"),
        (
            {"spec": {"containers": [{"name": "agent", "image": "mine"}]}},
            "spec.agentTemplate.spec.containers[0].image",
        ),
        (
            {"spec": {"containers": [{"name": "agent", "args": ["--insecure-no-token"]}]}},
            "spec.agentTemplate.spec.containers[0].args",
        ),
        (
            {"spec": {"containers": [{"name": "agent", "env": []}]}},
            "spec.agentTemplate.spec.containers[0].env",
        ),
        (
            {"spec": {"containers": [{"name": "agent"}, {"name": "agent"}]}},
            "spec.agentTemplate.spec.containers",
        ),
        ({"metadata": {"namespace": "kube-system"}}, "spec.agentTemplate.metadata.namespace"),
        ({"metadata": {"annotations": {"a": "b"}}}, "spec.agentTemplate.metadata.annotations"),
        (
            {"metadata": {"labels": {"sidecar.istio.io/inject": "true"}}},
            "spec.agentTemplate.metadata.labels",
        ),
    ],
)
def test_everything_outside_the_allowlist_is_refused(template: dict[str, Any], field: str) -> None:
    assert refusal(template).startswith(f"{field}:")


def test_the_allowlist_is_accepted() -> None:
    pool = SandboxPool.model_validate(
        {
            "metadata": {"name": "p"},
            "spec": {
                "agentTemplate": {
                    "metadata": {"labels": {"team": "a"}},
                    "spec": {
                        "nodeSelector": {"disk": "ssd"},
                        "tolerations": [{"key": "k", "operator": "Exists"}],
                        "affinity": {"podAntiAffinity": {"x": 1}},
                        "imagePullSecrets": [{"name": "regcred"}],
                        "priorityClassName": "high",
                        "containers": [{"name": "agent", "resources": {"limits": {"cpu": "2"}}}],
                    },
                }
            },
        }
    )
    assert pool.spec.agent_template is not None
    assert pool.spec.agent_template.pod_fields()["nodeSelector"] == {"disk": "ssd"}
    assert pool.spec.agent_template.agent_resources() == {"limits": {"cpu": "2"}}


def test_the_crd_schema_says_the_same() -> None:
    schema = crd_manifest(SandboxPool)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    template = schema["properties"]["spec"]["properties"]["agentTemplate"]
    assert "x-kubernetes-preserve-unknown-fields" not in template
    spec = template["properties"]["spec"]
    assert sorted(spec["properties"]) == sorted(
        [
            "nodeSelector", "tolerations", "affinity", "imagePullSecrets",
            "priorityClassName", "containers",
        ]
    )  # fmt: skip
    containers = spec["properties"]["containers"]
    assert containers["maxItems"] == 1
    assert containers["items"]["properties"]["name"]["enum"] == ["agent"]
    assert sorted(containers["items"]["properties"]) == ["name", "resources"]
    assert sorted(template["properties"]["metadata"]["properties"]) == ["labels"]
