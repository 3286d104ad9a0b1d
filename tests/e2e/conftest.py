"""End-to-end fixtures; `registry` and `demo_image` come from tests/infra_fixtures.py."""

from __future__ import annotations

import pytest

from tests.infra import RegistryProc


@pytest.fixture(scope="session")
def registry_addr(registry: RegistryProc) -> str:
    return registry.addr
