"""Session-scoped pytest fixtures over `tests.infra`: one private containerd, one loopback
registry and the pushed demo image per test session, started only when a test asks for them.

Registered for the whole tree by `tests/conftest.py` (`pytest_plugins`), so the contract,
integration and e2e tiers share one containerd instead of starting one each. When they cannot
start here (not root, a binary missing) every fixture skips with the reason, or fails with it
when `CI` is set (`tests.infra.cannot_run`).

- `containerd` → `ContainerdProc` (`.socket`, `.ctr(...)`); stopped and cleaned at session end.
- `registry` → `RegistryProc` (`.addr` = `127.0.0.1:PORT`, plain HTTP).
- `demo_image` → the pushed reference, e.g. `127.0.0.1:PORT/busybox:latest`.
- `cgroup_parent` → a cgroup path of this session (e.g. `/fsb-test-1234`), removed at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.infra import (
    ContainerdProc,
    RegistryProc,
    build_demo_image,
    cannot_run,
    missing_requirements,
    push_image,
    remove_cgroup,
    start_containerd,
    start_registry,
)


def _skip_unless_ready() -> None:
    why = missing_requirements()
    if why:
        cannot_run(why)


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdProc]:
    _skip_unless_ready()
    proc = start_containerd(tmp_path_factory.mktemp("ctd", numbered=True))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProc]:
    _skip_unless_ready()
    proc = start_registry(tmp_path_factory.mktemp("reg", numbered=True))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def demo_image(registry: RegistryProc, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = build_demo_image(tmp_path_factory.mktemp("img", numbered=True))
    return push_image(layout, registry.addr, "busybox:latest")


@pytest.fixture(scope="session")
def cgroup_parent() -> Iterator[str]:
    path = f"/fsb-test-{os.getpid()}"
    try:
        yield path
    finally:
        remove_cgroup(path)
