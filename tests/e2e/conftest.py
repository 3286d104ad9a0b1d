"""End-to-end fixtures; `registry` and `demo_image` come from tests/infra_fixtures.py, the
Kubernetes ones (`kube_crds`, `containerd`, ...) from tests/k8s_fixtures.py.

`shape` parametrises a module over both shapes of Fast Sandbox: `embedded` (`fsb server`) and
`kubernetes` (`fsb controller` replicas on a real kube-apiserver, agents as Pods of a process
kubelet). `shaped_server` is a started server of the module's shape, with one surface
(`tests.e2e._server.Server` / `tests.e2e._kube_server.KubeServer`), so the same CLI/SDK
acceptance tests run against both. The Kubernetes runs carry the `kubernetes` marker:
`pytest -m kubernetes tests/e2e` runs only them, `-m "not kubernetes"` only the embedded ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeAlias

import pytest

from tests.e2e._kube_server import KubeServer, new_kube_server, purge_kube
from tests.e2e._server import Server, new_server, purge
from tests.infra import RegistryProc

AnyServer: TypeAlias = Server | KubeServer

SHAPES = ["embedded", pytest.param("kubernetes", marks=pytest.mark.kubernetes)]


@pytest.fixture(scope="session")
def registry_addr(registry: RegistryProc) -> str:
    return registry.addr


@pytest.fixture(scope="module", params=SHAPES)
def shape(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def start_kube_server(request: pytest.FixtureRequest, **kwargs: object) -> KubeServer:
    """A started KubeServer on the session's apiserver, containerd and registry."""
    kube = request.getfixturevalue("kube_crds")
    containerd = request.getfixturevalue("containerd")
    srv = new_kube_server(
        kube.kubeconfig,
        containerd.socket,
        request.getfixturevalue("registry_addr"),
        request.getfixturevalue("cgroup_parent"),
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        srv.start()
    except BaseException:
        purge_kube(srv)
        raise
    return srv


@pytest.fixture(scope="module")
def shaped_server(shape: str, request: pytest.FixtureRequest) -> Iterator[AnyServer]:
    if shape == "embedded":
        srv = new_server(request.getfixturevalue("registry_addr"))
        try:
            srv.start()
            yield srv
        finally:
            purge(srv)
        return
    kube = start_kube_server(request)
    try:
        yield kube
    finally:
        purge_kube(kube)
