"""The limits an agent makes its pinned warm slots with, where limits cannot change after start.

Under gVisor (runsc has no `update`) a warm slot is claimed only by a create asking for exactly
the slot's limits (agent/warm.py, `SlotKind`). Every create the control plane sends carries
limits — the sandbox's own, else the pool's `sandboxDefaults`, else the server's defaults
(control/limits.py) — so a slot made with "none" would never be claimed. The fleet therefore
tells such agents the pool's effective defaults (`--warm-cpu-millis` and the two others), the
limits a create that asks for none gets. runc agents change limits at claim and need none.
"""

from __future__ import annotations

from fastsandbox.api.models import Runtime, SandboxPool, SandboxResources
from fastsandbox.control.limits import effective_limits, server_defaults

DEFAULT_CPU = "1"
DEFAULT_MEMORY = "512Mi"


def warm_limit_args(
    pool: SandboxPool, default_cpu: str = DEFAULT_CPU, default_memory: str = DEFAULT_MEMORY
) -> dict[str, int]:
    """`AgentArgs` fields for `pool`'s agents: empty unless a gVisor pool keeps warm slots."""
    spec = pool.spec
    if spec.runtime is not Runtime.GVISOR or spec.warm_slots <= 0:
        return {}
    limits = effective_limits(
        SandboxResources(), spec, server_defaults(default_cpu, default_memory)
    )
    return {
        "warm_cpu_millis": limits.cpu_millis,
        "warm_memory_bytes": limits.memory_bytes,
        "warm_pids_limit": limits.pids,
    }
