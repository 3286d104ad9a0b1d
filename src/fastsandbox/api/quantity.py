"""Kubernetes-style resource quantities → numbers the runtime understands.

Parsing is exact (`Decimal`, not float) so that a tiny value such as `cpu: "0.0001"` is seen as
the 0.1 millicore it is and refused by the minimum check, instead of being truncated to 0 — which
the runtime would read as "no limit". The minimums themselves live here, next to the parsers, so
the models, the CRD schema and the control plane all refuse the same values.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
_DECIMAL = {"k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}

# cpu: cores ("2", "0.5") or millicores ("500m"). Bytes: a count with an optional SI or binary
# suffix; no "m" (a milli-byte is a typo, not a size).
CPU_PATTERN = r"^[0-9]+(\.[0-9]+)?m?$"
BYTES_PATTERN = r"^[0-9]+(\.[0-9]+)?(k|Ki|M|Mi|G|Gi|T|Ti)?$"
# Long enough for any sane quantity; a bound also keeps the CRD's CEL rules cheap.
MAX_QUANTITY_LENGTH = 32

# The smallest limits a sandbox can be given, and why:
# - cpu 10m: runc refuses a CFS quota under 1 ms per period; our period is 100 ms, so 1 ms is
#   10 millicores. Less would be silently raised (or refused by runc at start).
# - memory 6Mi: the container's own init (runc's `runc init` and our supervisor) is charged to the
#   sandbox's cgroup while it starts; below a few MiB the container is OOM-killed before the user's
#   command runs. Docker refuses under 6 MB for the same reason.
# - pids 8: the supervisor, a shell and a pipeline of a few commands; fewer and `sh -c "a | b"`
#   cannot fork.
# - disk 1Mi: below that not even a small file fits; it is a typo for a larger unit.
MIN_CPU_MILLIS = 10
MIN_MEMORY_BYTES = 6 * 1024**2
MIN_PIDS = 8
MIN_DISK_BYTES = 1024**2
MIN_CPU = "10m"
MIN_MEMORY = "6Mi"
MIN_DISK = "1Mi"


def _number(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None
    if not value.is_finite():
        raise ValueError(f"{text!r} is not a number")
    return value


def cpu_exact(quantity: str) -> Decimal:
    """Millicores, exactly: `"0.0001"` → 0.1."""
    if not re.match(CPU_PATTERN, quantity):
        raise ValueError("must be a cpu quantity such as 500m, 0.5 or 2")
    if quantity.endswith("m"):
        return _number(quantity[:-1])
    return _number(quantity) * 1000


def bytes_exact(quantity: str) -> Decimal:
    """Bytes, exactly: `"1.5Ki"` → 1536."""
    if not re.match(BYTES_PATTERN, quantity):
        raise ValueError("must be a size such as 256Mi, 1Gi or 1000000")
    for suffix, factor in (_BINARY | _DECIMAL).items():
        if quantity.endswith(suffix):
            return _number(quantity[: -len(suffix)]) * factor
    return _number(quantity)


def cpu_millis(quantity: str) -> int:
    """`"500m"` → 500, `"2"` → 2000, `"0.5"` → 500 (fractions of a millicore dropped)."""
    return int(cpu_exact(quantity))


def memory_bytes(quantity: str) -> int:
    """`"256Mi"` → 268435456, `"1G"` → 10**9, `"1024"` → 1024."""
    return int(bytes_exact(quantity))


def check_cpu(quantity: str) -> str:
    if cpu_exact(quantity) < MIN_CPU_MILLIS:
        raise ValueError(
            f"{quantity!r} is below the minimum {MIN_CPU} (runc cannot enforce a smaller CPU "
            "quota; a zero would mean unlimited)"
        )
    return quantity


def check_memory(quantity: str) -> str:
    if bytes_exact(quantity) < MIN_MEMORY_BYTES:
        raise ValueError(
            f"{quantity!r} is below the minimum {MIN_MEMORY} (the sandbox's init needs that much "
            "to start; a zero would mean unlimited)"
        )
    return quantity


def check_disk(quantity: str) -> str:
    if bytes_exact(quantity) < MIN_DISK_BYTES:
        raise ValueError(f"{quantity!r} is below the minimum {MIN_DISK}")
    return quantity


def check_pids(value: int) -> int:
    if value < MIN_PIDS:
        raise ValueError(
            f"{value} is below the minimum {MIN_PIDS} (a shell and a pipeline need that many "
            "processes; a zero would mean unlimited)"
        )
    return value
