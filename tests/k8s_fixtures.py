"""Session-scoped pytest fixtures over `tests.k8s_infra`: one real etcd + kube-apiserver per test
session, our CRDs installed once, and a fresh namespace per test that asks for one.

Registered for the whole tree by `tests/conftest.py` (`pytest_plugins`); nothing starts unless a
test asks. Mark such tests `@pytest.mark.kubernetes` so `pytest -m kubernetes` selects the tier
(docs/kubernetes-test-tier.md).

- `kube_apiserver` → `KubeApiserverProc` (`.kubeconfig`, `.url`, `.etcdctl(...)`); skips only
  when the binaries are neither cached nor buildable (no Go toolchain), and fails then under `CI`.
- `kube_admin` → a synchronous lightkube `Client` with the session's system:masters credentials.
- `kube_crds` → `kube_apiserver`, after `fastsandbox.api.crds.crd_manifests()` are applied and
  Established (and served).
- `kube_namespace` → a fresh namespace name; at the end its Sandboxes and SandboxPools lose
  their finalizers and are deleted, its Pods are deleted at once, then the namespace (without a
  namespace controller it stays Terminating, which is harmless in a throwaway apiserver).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator

import httpx2
import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.generic_resource import GenericNamespacedResource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.core_v1 import Namespace, Pod
from lightkube.types import PatchType

from tests.infra import cannot_run
from tests.k8s_infra import KubeApiserverProc, KubeBinariesUnavailable, start_kube_apiserver

log = logging.getLogger(__name__)

FIELD_MANAGER = "fastsandbox-tests"


@pytest.fixture(scope="session")
def kube_apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApiserverProc]:
    try:
        api = start_kube_apiserver(tmp_path_factory.mktemp("kube", numbered=True))
    except KubeBinariesUnavailable as exc:
        cannot_run(str(exc))
    log.info("kube-apiserver ready in %.1f s at %s", api.started_in, api.url)
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture(scope="session")
def kube_admin(kube_apiserver: KubeApiserverProc) -> Iterator[Client]:
    client = Client(KubeConfig.from_file(kube_apiserver.kubeconfig), field_manager=FIELD_MANAGER)
    try:
        yield client
    finally:
        client.close()


def _established(crd: CustomResourceDefinition) -> bool:
    conditions = crd.status.conditions if crd.status and crd.status.conditions else []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def install_crds(client: Client, *, timeout: float = 30) -> None:
    """Apply `crd_manifests()` (server-side apply) and wait until both are Established and
    their REST endpoints answer."""
    from fastsandbox._kube.resources import SandboxPoolResource, SandboxResource
    from fastsandbox.api.crds import crd_manifests

    names = []
    for manifest in crd_manifests():
        name = manifest["metadata"]["name"]
        client.patch(
            CustomResourceDefinition,
            name,
            manifest,
            patch_type=PatchType.APPLY,
            field_manager=FIELD_MANAGER,
            force=True,
        )
        names.append(name)
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        pending = {n for n in pending if not _established(client.get(CustomResourceDefinition, n))}
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"CRDs not Established after {timeout} s: {sorted(pending)}")
        time.sleep(0.05)
    # Established means accepted; the REST endpoint follows within moments (envtest polls too).
    for res in (SandboxResource, SandboxPoolResource):
        while True:
            try:
                list(client.list(res, namespace="default"))
                break
            except ApiError as exc:
                if exc.status.code != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    # The first write of a new kind waits ~2 s while the ResourceQuota admission plugin adds an
    # evaluator for it; a dry-run create pays that here instead of inside the first test.
    probe = {"metadata": {"name": "warm-up", "namespace": "default"}, "spec": {}}
    client.create(SandboxPoolResource.from_dict(probe), dry_run=True)


@pytest.fixture(scope="session")
def kube_crds(kube_apiserver: KubeApiserverProc, kube_admin: Client) -> KubeApiserverProc:
    install_crds(kube_admin)
    return kube_apiserver


def remove_all(client: Client, res: type[GenericNamespacedResource], namespace: str | None) -> None:
    """Delete every object of `res` (in `namespace`, or everywhere), finalizers stripped first."""
    try:
        found = list(client.list(res, namespace=namespace if namespace is not None else "*"))
    except ApiError as exc:
        if exc.status.code == 404:  # the CRD is not installed
            return
        raise
    except httpx2.HTTPStatusError as exc:
        # Without the CRD the apiserver's 404 is not a Status object, so lightkube raises the
        # transport's error instead of ApiError.
        if exc.response.status_code == 404:
            return
        raise
    for obj in found:
        meta = obj.metadata
        assert meta is not None and meta.name is not None
        with contextlib.suppress(ApiError):
            if meta.finalizers:
                client.patch(
                    res,
                    meta.name,
                    {"metadata": {"finalizers": None}},
                    namespace=meta.namespace,
                    patch_type=PatchType.MERGE,
                )
        with contextlib.suppress(ApiError):
            client.delete(res, meta.name, namespace=meta.namespace)


@pytest.fixture
def kube_namespace(kube_apiserver: KubeApiserverProc, kube_admin: Client) -> Iterator[str]:
    from fastsandbox._kube.resources import SandboxPoolResource, SandboxResource

    name = f"t-{uuid.uuid4().hex[:10]}"
    kube_admin.create(Namespace(metadata=ObjectMeta(name=name)))
    try:
        yield name
    finally:
        for res in (SandboxResource, SandboxPoolResource):
            remove_all(kube_admin, res, name)
        with contextlib.suppress(ApiError):
            for pod in kube_admin.list(Pod, namespace=name):
                assert pod.metadata is not None and pod.metadata.name is not None
                kube_admin.delete(Pod, pod.metadata.name, namespace=name, grace_period=0)
        with contextlib.suppress(ApiError):
            kube_admin.delete(Namespace, name)
