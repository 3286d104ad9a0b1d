"""A sandbox's effective limits: its own `spec.resources`, else its pool's `sandboxDefaults`,
else the server's defaults — always bounded by the pool's `sandboxMax`.

Every sandbox the control plane starts gets a cpu, memory, pids, disk and log limit: an unset field
takes a default and a zero is refused by the models, so there is no way to ask for "unlimited".
A value above `sandboxMax` is INVALID_ARGUMENT naming both fields, before a slot is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic.alias_generators import to_camel

from fastsandbox.api.models import (
    DEFAULT_LOG_MAX_BYTES,
    LIMIT_FIELDS,
    SandboxLimits,
    SandboxPoolSpec,
    SandboxResources,
    limit_value,
)
from fastsandbox.api.quantity import cpu_millis, memory_bytes
from fastsandbox.errors import InvalidArgument
from fastsandbox.settings import DEFAULT_SANDBOX_DISK, SandboxDefaults

# The pids limit of a sandbox when neither it nor its pool sets one: generous for a build, small
# enough that a fork bomb stops long before the host's own table fills.
DEFAULT_PIDS = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """What the agent enforces; every field set (disk is the writable layer's size)."""

    cpu_millis: int
    memory_bytes: int
    pids: int
    disk_bytes: int
    log_max_bytes: int


def server_defaults(cpu: str, memory: str, disk: str = DEFAULT_SANDBOX_DISK) -> SandboxLimits:
    return SandboxLimits(
        cpu=cpu, memory=memory, pids=DEFAULT_PIDS, disk=disk, log_max_bytes=DEFAULT_LOG_MAX_BYTES
    )


def defaults_of(settings: SandboxDefaults) -> SandboxLimits:
    """The control plane's own defaults (`fsb server` / `fsb controller` settings) as limits."""
    return server_defaults(
        settings.default_sandbox_cpu, settings.default_sandbox_memory, settings.default_sandbox_disk
    )


def pool_defaults(pool: SandboxPoolSpec, fallback: SandboxLimits) -> Limits:
    """What a sandbox of `pool` that asks for no limits gets: the limits its agents make warm
    slots with, so that such a create claims one without changing them."""
    return effective_limits(SandboxResources(), pool, fallback)


def effective_limits(
    resources: SandboxResources, pool: SandboxPoolSpec | None, fallback: SandboxLimits
) -> Limits:
    """The limits to start with. Raises InvalidArgument when a value asked for is above the
    pool's sandboxMax."""
    defaults = pool.sandbox_defaults if pool is not None else SandboxLimits()
    most = pool.sandbox_max if pool is not None else SandboxLimits()
    chosen: dict[str, str | int | None] = {}
    for name in LIMIT_FIELDS:
        asked = getattr(resources, name, None)
        bound = getattr(most, name)
        if asked is not None:
            if bound is not None and limit_value(name, asked) > limit_value(name, bound):
                wire = to_camel(name)
                raise InvalidArgument(
                    f"spec.resources.{wire}: {asked} is above the pool's sandboxMax.{wire} "
                    f"({bound}); ask for at most {bound}"
                )
            chosen[name] = asked
            continue
        value = getattr(defaults, name)
        if value is None:
            value = getattr(fallback, name)
            # A server default above the pool's maximum must not make every unset sandbox of
            # that pool fail: the maximum is the default then.
            if value is not None and bound is not None:
                value = bound if limit_value(name, value) > limit_value(name, bound) else value
        chosen[name] = value
    cpu, memory, pids, disk, log_max = (chosen[n] for n in LIMIT_FIELDS)
    return Limits(
        cpu_millis=cpu_millis(str(cpu)) if cpu is not None else 0,
        memory_bytes=memory_bytes(str(memory)) if memory is not None else 0,
        pids=int(pids) if pids is not None else DEFAULT_PIDS,
        disk_bytes=memory_bytes(str(disk if disk is not None else DEFAULT_SANDBOX_DISK)),
        log_max_bytes=int(log_max) if log_max is not None else DEFAULT_LOG_MAX_BYTES,
    )
