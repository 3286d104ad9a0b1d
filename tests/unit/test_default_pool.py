"""The embedded server's pools: the default one sized from the machine
(`server.default_pool_spec`), and no pool field stored only to be ignored."""

from __future__ import annotations

import json
import re

import pytest

from fastsandbox.api.models import ObjectMeta, PoolCapacity, SandboxPool, SandboxPoolSpec
from fastsandbox.control.fastpath.service import pool_from_json
from fastsandbox.errors import InvalidArgument
from fastsandbox.server import (
    DEFAULT_POOL,
    check_local_pool,
    default_pool_spec,
    ensure_default_pool,
)
from fastsandbox.store.memory import MemoryStore

GIB = 1024**3


def slots(spec: SandboxPoolSpec) -> int:
    return spec.capacity.pool_max * spec.max_sandboxes_per_agent


def test_two_cores_serve_64_sandboxes_starting_from_one_agent() -> None:
    spec = default_pool_spec(cpus=2, memory_bytes=4 * GIB)
    assert spec.capacity.pool_min == 1
    assert slots(spec) >= 64
    assert spec.capacity.pool_max == 4


def test_a_bigger_machine_gets_a_bigger_pool_bounded_by_memory() -> None:
    assert slots(default_pool_spec(cpus=8, memory_bytes=64 * GIB)) == 256
    # 8 cores but 4 GiB: memory decides (64 slots of 64 MiB), never below 64.
    assert slots(default_pool_spec(cpus=8, memory_bytes=4 * GIB)) == 64
    assert slots(default_pool_spec(cpus=1, memory_bytes=1 * GIB)) == 64


async def test_the_old_fixed_default_is_resized_and_a_changed_one_kept() -> None:
    store = MemoryStore()
    try:
        old = SandboxPoolSpec(
            capacity=PoolCapacity(pool_min=1, pool_max=1), max_sandboxes_per_agent=5
        )
        await store.create(
            SandboxPool(metadata=ObjectMeta(name=DEFAULT_POOL, namespace="default"), spec=old)
        )
        await ensure_default_pool(store)
        got = await store.get(SandboxPool, "default", DEFAULT_POOL)
        assert got.spec == default_pool_spec()

        got.spec.capacity = PoolCapacity(pool_min=2, pool_max=2)
        await store.update(got)
        await ensure_default_pool(store)
        kept = await store.get(SandboxPool, "default", DEFAULT_POOL)
        assert kept.spec.capacity == PoolCapacity(pool_min=2, pool_max=2)
    finally:
        await store.close()


# ------------------------------------------------------------- no setting that does nothing


def test_warm_slots_are_taken_and_bad_counts_refused_naming_the_field() -> None:
    assert (
        pool_from_json('{"metadata": {"name": "w"}, "spec": {"warmSlots": 2}}').spec.warm_slots == 2
    )
    for bad in (-1, 1001):
        with pytest.raises(InvalidArgument, match=r"spec\.warmSlots"):
            pool_from_json(json.dumps({"metadata": {"name": "w"}, "spec": {"warmSlots": bad}}))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"agentResources": {"cpu": "1"}}, "spec.agentResources"),
        ({"agentTemplate": {"spec": {}}}, "spec.agentTemplate"),
    ],
)
def test_the_embedded_server_refuses_pod_only_fields(spec: dict[str, object], field: str) -> None:
    pool = pool_from_json(json.dumps({"metadata": {"name": "k"}, "spec": spec}))
    with pytest.raises(InvalidArgument, match=re.escape(field)):
        check_local_pool(pool)
    check_local_pool(pool_from_json('{"metadata": {"name": "k"}}'))
