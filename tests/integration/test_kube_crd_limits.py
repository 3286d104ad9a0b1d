"""The generated CRDs refuse the same limits the models refuse, on a real kube-apiserver: a
zero or tiny quantity (CEL `quantity()` rules), a pids count under the minimum, and a pool whose
sandboxDefaults are above its sandboxMax — and they accept the minimums themselves."""

from __future__ import annotations

from typing import Any

import pytest
from lightkube import ApiError, Client

from fastsandbox._kube.resources import resource_for
from fastsandbox.api.models import Sandbox, SandboxPool
from tests.k8s_infra import KubeApiserverProc

pytestmark = [pytest.mark.kubernetes, pytest.mark.integration, pytest.mark.timeout(120)]


def _sandbox(name: str, namespace: str, resources: dict[str, Any]) -> Any:
    res = resource_for(Sandbox)
    return res(
        apiVersion="fastsandbox.io/v1alpha1",
        kind="Sandbox",
        metadata={"name": name, "namespace": namespace},
        spec={"image": "busybox", "poolRef": "p", "resources": resources, "leaseSeconds": 5},
    )


def _pool(name: str, namespace: str, spec: dict[str, Any]) -> Any:
    res = resource_for(SandboxPool)
    return res(
        apiVersion="fastsandbox.io/v1alpha1",
        kind="SandboxPool",
        metadata={"name": name, "namespace": namespace},
        spec=spec,
    )


def _refused(admin: Client, obj: Any) -> str:
    with pytest.raises(ApiError) as info:
        admin.create(obj)
    assert info.value.status.code == 422, info.value.status
    return str(info.value.status.message)


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"memory": "0"}, "spec.resources.memory"),
        ({"cpu": "0.0001"}, "spec.resources.cpu"),
        ({"cpu": "9m"}, "spec.resources.cpu"),
        ({"pids": 0}, "spec.resources.pids"),
        ({"disk": "0"}, "spec.resources.disk"),
        ({"memory": "100m"}, "spec.resources.memory"),
    ],
)
def test_the_apiserver_refuses_tiny_limits(
    kube_crds: KubeApiserverProc,
    kube_admin: Client,
    kube_namespace: str,
    resources: dict[str, Any],
    field: str,
) -> None:
    assert field in _refused(kube_admin, _sandbox("tiny", kube_namespace, resources))


def test_the_apiserver_accepts_the_minimums_and_checks_pool_bounds(
    kube_crds: KubeApiserverProc, kube_admin: Client, kube_namespace: str
) -> None:
    minimums = {"cpu": "10m", "memory": "6Mi", "pids": 8, "disk": "1Mi"}
    kube_admin.create(_sandbox("smallest", kube_namespace, minimums))
    message = _refused(
        kube_admin,
        _pool(
            "upside-down",
            kube_namespace,
            {"sandboxDefaults": {"memory": "2Gi", "pids": 50}, "sandboxMax": {"memory": "1Gi"}},
        ),
    )
    assert "sandboxDefaults.memory" in message and "sandboxMax.memory" in message
    assert "pids" not in message  # a bound with no maximum is no violation
    kube_admin.create(
        _pool(
            "bounded",
            kube_namespace,
            {
                "sandboxDefaults": {"memory": "512Mi", "logMaxBytes": 65536},
                "sandboxMax": {"memory": "1Gi", "pids": 512},
            },
        )
    )
