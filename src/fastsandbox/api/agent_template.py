"""A pool's `agentTemplate`: the few Pod fields a pool's author may set on its agent Pods.

An agent Pod mounts the node's containerd socket, which is root on the node. If the template
could add a container, a volume, a securityContext, a ServiceAccount or host namespaces, whoever
may write a SandboxPool could run anything as root on any node. So the template is not a
PodTemplateSpec but this allowlist: where the Pod runs (nodeSelector, tolerations, affinity,
priorityClassName), how its image is pulled (imagePullSecrets), how big the agent container is
(`containers[0]`, named `agent`, only `resources`), and plain labels. Everything else is refused
naming the field: here for the Fast-Path and `fsb apply`, by the CRD schema (generated from these
models) for `kubectl apply`.

Annotations are refused, and labels may not carry a prefix (`example.com/x`): both drive admission
webhooks (sidecar or secret injection such as `sidecar.istio.io/inject` or
`vault.hashicorp.com/agent-inject`) and runtime behaviour (AppArmor), which would give a pool's
author more than placement and bookkeeping.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from fastsandbox.api._base import _Model

AGENT_CONTAINER = "agent"
AGENT_TEMPLATE_FIELDS = (
    "metadata.labels, spec.nodeSelector, spec.tolerations, spec.affinity, spec.imagePullSecrets, "
    "spec.priorityClassName, spec.containers[0].resources (name agent)"
)
MAX_LABELS = 32
_LABEL_NAME = r"^([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
_QUANTITY = re.compile(
    r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
)


def _agent_name(value: str) -> str:
    if value != AGENT_CONTAINER:
        raise ValueError(
            f"only the agent container (name {AGENT_CONTAINER!r}) may be given, and only its "
            "resources: sidecars are not allowed"
        )
    return value


def _one_container(value: list[Any]) -> list[Any]:
    # After the items: a sidecar is refused naming containers[1] (by its name) before this.
    if len(value) > 1:
        raise ValueError("at most one container, the agent (only its resources)")
    return value


def _plain_labels(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        if "/" in key or not re.match(_LABEL_NAME, key):
            raise ValueError(
                f"label {key!r}: only unprefixed label names (letters, digits, '-', '_', '.', "
                "at most 63) may be set: prefixed labels steer admission webhooks"
            )
        if not re.match(_LABEL_VALUE, item):
            raise ValueError(f"label {key!r}: {item!r} is not a valid label value")
    return value


def _quantity(value: str) -> str:
    if not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a quantity (such as 500m, 2, 256Mi or 1Gi)")
    return value


Quantity = Annotated[str, Field(max_length=64), AfterValidator(_quantity)]


class AgentTemplateMeta(_Model):
    labels: Annotated[
        dict[str, Annotated[str, Field(max_length=63)]],
        Field(max_length=MAX_LABELS),
        AfterValidator(_plain_labels),
    ] = Field(default_factory=dict)


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Affinity(_Model):
    """Kubernetes' own affinity terms, passed through: they only say where the Pod may run."""

    node_affinity: dict[str, Any] | None = None
    pod_affinity: dict[str, Any] | None = None
    pod_anti_affinity: dict[str, Any] | None = None


class LocalObjectReference(_Model):
    name: Annotated[str, Field(min_length=1, max_length=253)]


class ResourceRequirements(_Model):
    requests: dict[str, Quantity] | None = None
    limits: dict[str, Quantity] | None = None


class AgentContainer(_Model):
    name: Annotated[str, AfterValidator(_agent_name)]
    resources: ResourceRequirements | None = None


class AgentTemplateSpec(_Model):
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = None
    affinity: Affinity | None = None
    image_pull_secrets: list[LocalObjectReference] | None = None
    priority_class_name: str | None = None
    containers: Annotated[list[AgentContainer], AfterValidator(_one_container)] | None = None


class AgentTemplate(_Model):
    metadata: AgentTemplateMeta = Field(default_factory=AgentTemplateMeta)
    spec: AgentTemplateSpec = Field(default_factory=AgentTemplateSpec)

    def pod_fields(self) -> dict[str, Any]:
        """The Pod spec fields this template sets (camelCase, unset ones left out)."""
        data: dict[str, Any] = self.spec.model_dump(
            mode="json", by_alias=True, exclude_none=True, exclude={"containers"}
        )
        return data

    def agent_resources(self) -> dict[str, Any] | None:
        """The agent container's `resources`, when the template gives them."""
        for container in self.spec.containers or ():
            if container.resources is not None:
                out: dict[str, Any] = container.resources.model_dump(
                    mode="json", by_alias=True, exclude_none=True
                )
                return out
        return None
