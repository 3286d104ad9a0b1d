"""Fixtures shared by every test tier: the real-infrastructure ones live in
`tests/infra_fixtures.py` (containerd, registry, demo_image, cgroup_parent) and
`tests/k8s_fixtures.py` (a real kube-apiserver: kube_apiserver, kube_crds, kube_namespace).
The markers are registered in pyproject.toml; a tier that cannot run here skips, or fails when
`CI` is set (`tests.infra.cannot_run`)."""

pytest_plugins = ["tests.infra_fixtures", "tests.k8s_fixtures", "tests.k8s_kubelet"]
