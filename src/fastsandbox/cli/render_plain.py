"""The text of `fsb run`'s answer, without typer or the models: shared by cli/render.py (the
typer path) and cli/run_fast.py (the lean path), so both print the same lines."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

TIMING_KEYS = ("acceptedMs", "scheduledMs", "runtimeReadyMs", "pulledMs", "scaledMs")


def field_lines(pairs: Iterable[tuple[str, Any]]) -> list[str]:
    """`key: value` lines, aligned, leaving out empty values."""
    shown = [(k, v) for k, v in pairs if v not in (None, "", [], {})]
    width = max((len(k) for k, _ in shown), default=0) + 1
    return [f"{key + ':':<{width}} {value}" for key, value in shown]


def timings_text(timings: Mapping[str, Any] | None) -> str:
    if not timings:
        return ""
    parts = []
    for key, label in (
        ("acceptedMs", "accepted"),
        ("scheduledMs", "scheduled"),
        ("runtimeReadyMs", "runtime ready"),
        ("pulledMs", "of which pulling the image"),
        ("scaledMs", "waited for a new agent"),
    ):
        if timings.get(key) is not None:
            parts.append(f"{label} {float(timings[key]):.1f} ms")
    return ", ".join(parts)


def created_lines(
    *,
    namespace: str,
    name: str,
    uid: str,
    phase: str,
    agent: str,
    agent_ip: str,
    container_id: str,
    endpoints: Iterable[str],
    timings: Mapping[str, Any],
) -> list[str]:
    """`fsb run`'s human answer: where it runs and how long each step took."""
    return field_lines(
        [
            ("sandbox", f"{namespace}/{name}"),
            ("uid", uid),
            ("phase", phase),
            ("agent", f"{agent} ({agent_ip})" if agent_ip else agent),
            ("container", container_id),
            ("endpoints", ", ".join(endpoints)),
            ("timings", timings_text(timings)),
        ]
    )
