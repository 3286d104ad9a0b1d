"""Fixtures shared by every test tier: the real-infrastructure ones live in
`tests/infra_fixtures.py` (containerd, registry, demo_image, cgroup_parent)."""

pytest_plugins = ["tests.infra_fixtures"]
