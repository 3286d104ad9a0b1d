"""Fixtures shared by every test tier: the real-infrastructure ones live in
`tests/infra_fixtures.py` (containerd, registry, demo_image, cgroup_parent) and
`tests/k8s_fixtures.py` (a real kube-apiserver: kube_apiserver, kube_crds, kube_namespace)."""

import pytest

pytest_plugins = ["tests.infra_fixtures", "tests.k8s_fixtures", "tests.k8s_kubelet"]


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml lists the other markers; this one belongs to the Kubernetes tier's fixtures.
    config.addinivalue_line(
        "markers", "kubernetes: needs a real kube-apiserver (built by scripts/build-kube-apiserver)"
    )
    config.addinivalue_line(
        "markers", "image: builds the deployable image (scripts/build-image), with FSB_TEST_IMAGE=1"
    )
