"""fleet/warm_limits.py: which agents are told a pool's default limits for their warm slots."""

from __future__ import annotations

from fastsandbox.agent.args import AgentArgs
from fastsandbox.api.models import ObjectMeta, SandboxLimits, SandboxPool, SandboxPoolSpec
from fastsandbox.fleet.warm_limits import warm_limit_args


def _pool(**spec: object) -> SandboxPool:
    return SandboxPool(
        metadata=ObjectMeta(name="p", namespace="default"),
        spec=SandboxPoolSpec.model_validate(spec),
    )


def test_a_gvisor_pool_with_warm_slots_gets_its_effective_defaults() -> None:
    pool = _pool(runtime="gvisor", warmSlots=1, sandboxDefaults=SandboxLimits(memory="256Mi"))
    got = warm_limit_args(pool, "2", "1Gi")
    # The pool's memory default wins over the server's; cpu falls back to the server's.
    assert got == {
        "warm_cpu_millis": 2000,
        "warm_memory_bytes": 256 << 20,
        "warm_pids_limit": 1024,
    }
    argv = AgentArgs(name="a", pool="p", namespace="default", **got).argv()  # type: ignore[arg-type]
    assert "--warm-cpu-millis=2000" in argv and "--warm-pids-limit=1024" in argv


def test_runc_pools_and_pools_without_slots_get_nothing() -> None:
    assert warm_limit_args(_pool(runtime="runc", warmSlots=2)) == {}
    assert warm_limit_args(_pool(runtime="gvisor")) == {}
    assert "--warm-cpu-millis" not in " ".join(AgentArgs(name="a").argv())
