"""Kubernetes-style resource quantities → numbers the runtime understands."""

from __future__ import annotations

_BINARY = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
_DECIMAL = {"k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def cpu_millis(quantity: str) -> int:
    """`"500m"` → 500, `"2"` → 2000, `"0.5"` → 500."""
    if quantity.endswith("m"):
        return int(float(quantity[:-1]))
    return int(float(quantity) * 1000)


def memory_bytes(quantity: str) -> int:
    """`"256Mi"` → 268435456, `"1G"` → 10**9, `"1024"` → 1024."""
    for suffix, factor in (_BINARY | _DECIMAL).items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(float(quantity))
