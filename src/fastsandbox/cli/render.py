"""How the CLI shows things: tables and summaries to stdout, diagnostics to stderr.

Inputs are the wire dicts the server sends (camelCase, `to_wire` form), so `-o json` prints
exactly the API object and the read verbs never need the pydantic models. Rich is imported only
for tables.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

from fastsandbox.cli.options import Output
from fastsandbox.cli.render_plain import (
    created_lines,
    field_lines,
    timings_text,
)

if TYPE_CHECKING:
    from fastsandbox.sdk._core import CreateResult


def error(message: str) -> None:
    """One line on stderr; the message says what to do."""
    line = " ".join(message.split())
    typer.echo(f"error: {line}", err=True)


def structured(data: Any, output: Output) -> None:
    """Print `data` as JSON or YAML for scripts."""
    if output is Output.yaml:
        import yaml

        typer.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), nl=False)
    else:
        typer.echo(json.dumps(data, indent=2))


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """kubectl-style age: `42s`, `7m`, `3h`, `12d`."""
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    # kubectl's look: no borders, three spaces between columns, so `awk '{print $1}'` works.
    table = Table(box=None, padding=(0, 3, 0, 0), pad_edge=False, highlight=False)
    for header in headers:
        table.add_column(header, no_wrap=True, overflow="ignore")
    for row in rows:
        table.add_row(*row)
    # Piped into awk/grep, rich would fold to 80 columns: give it room instead.
    width = None if sys.stdout.isatty() else 10_000
    Console(highlight=False, width=width, soft_wrap=True).print(table)


def token_table(rows: Sequence[tuple[str, str, str, str]]) -> None:
    _table(["ID", "NAMESPACE", "CREATED", "EXPIRES"], rows)


def _get(data: Mapping[str, Any], *path: str, default: Any = "") -> Any:
    value: Any = data
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return default
        value = value[key]
    return value


def sandbox_table(items: Sequence[Mapping[str, Any]], all_namespaces: bool) -> None:
    if not items:
        typer.echo("No sandboxes found.", err=True)
        return
    headers = ["NAMESPACE"] if all_namespaces else []
    headers += ["NAME", "PHASE", "AGENT", "ENDPOINTS", "AGE"]
    rows = []
    for item in items:
        row = [_get(item, "metadata", "namespace")] if all_namespaces else []
        row += [
            _get(item, "metadata", "name"),
            _get(item, "status", "phase", default="Pending"),
            _get(item, "status", "assignedAgent") or "<none>",
            ",".join(_get(item, "status", "endpoints", default=[])) or "<none>",
            age(_get(item, "metadata", "creationTimestamp", default=None)),
        ]
        rows.append(row)
    _table(headers, rows)


def pool_table(items: Sequence[Mapping[str, Any]], all_namespaces: bool) -> None:
    if not items:
        typer.echo("No pools found.", err=True)
        return
    headers = ["NAMESPACE"] if all_namespaces else []
    headers += ["NAME", "RUNTIME", "AGENTS", "SLOTS", "MIN", "MAX", "PER-AGENT", "AGE"]
    rows = []
    for item in items:
        row = [_get(item, "metadata", "namespace")] if all_namespaces else []
        agents = _get(item, "status", "agents", default={})
        slots = _get(item, "status", "slots", default={})
        row += [
            _get(item, "metadata", "name"),
            _get(item, "spec", "runtime", default="runc"),
            f"{agents.get('ready', 0)}/{agents.get('total', 0)}",
            f"{slots.get('allocated', 0)}/{slots.get('total', 0)}",
            str(_get(item, "spec", "capacity", "poolMin", default=0)),
            str(_get(item, "spec", "capacity", "poolMax", default=0)),
            str(_get(item, "spec", "maxSandboxesPerAgent", default="")),
            age(_get(item, "metadata", "creationTimestamp", default=None)),
        ]
        rows.append(row)
    _table(headers, rows)


def _fields(pairs: Iterable[tuple[str, Any]]) -> None:
    for line in field_lines(pairs):
        typer.echo(line)


def created(result: CreateResult) -> None:
    """`fsb run`'s human answer: where it runs and how long each step took."""
    t = result.timings
    for line in created_lines(
        namespace=result.namespace,
        name=result.name,
        uid=result.uid,
        phase=result.phase,
        agent=result.agent,
        agent_ip=result.agent_ip,
        container_id=result.container_id,
        endpoints=result.endpoints,
        timings={
            "acceptedMs": t.accepted_ms,
            "scheduledMs": t.scheduled_ms,
            "runtimeReadyMs": t.runtime_ready_ms,
            "pulledMs": t.pulled_ms,
            "scaledMs": t.scaled_ms,
        },
    ):
        typer.echo(line)


def sandbox_detail(item: Mapping[str, Any]) -> None:
    meta: Mapping[str, Any] = item.get("metadata", {})
    spec: Mapping[str, Any] = item.get("spec", {})
    status: Mapping[str, Any] = item.get("status", {})
    env = " ".join(f"{e.get('name')}={e.get('value', '')}" for e in spec.get("env", []))
    labels = ",".join(f"{k}={v}" for k, v in meta.get("labels", {}).items())
    conditions = "; ".join(
        f"{c.get('type')}={c.get('status')}" + (f" ({c['reason']})" if c.get("reason") else "")
        for c in status.get("conditions", [])
    )
    _fields(
        [
            ("Name", meta.get("name")),
            ("Namespace", meta.get("namespace")),
            ("UID", meta.get("uid")),
            ("Labels", labels),
            ("Created", meta.get("creationTimestamp")),
            ("Deleting since", meta.get("deletionTimestamp")),
            ("Image", spec.get("image")),
            ("Pool", spec.get("poolRef")),
            ("Command", " ".join(spec.get("command", []))),
            ("Args", " ".join(spec.get("args", []))),
            ("Env", env),
            ("Working dir", spec.get("workingDir")),
            ("Ports", ", ".join(str(p) for p in spec.get("exposedPorts", []))),
            ("Expires", spec.get("expireTime")),
            ("Failure policy", spec.get("failurePolicy")),
            ("Phase", status.get("phase", "Pending")),
            ("Message", status.get("message")),
            ("Agent", status.get("assignedAgent")),
            ("Agent IP", status.get("agentIP")),
            ("Container", status.get("containerID")),
            ("Endpoints", ", ".join(status.get("endpoints", []))),
            ("Started", status.get("startedAt")),
            ("Exit code", status.get("exitCode")),
            ("Timings", timings_text(status.get("timings"))),
            ("Conditions", conditions),
        ]
    )


def pool_detail(item: Mapping[str, Any]) -> None:
    meta: Mapping[str, Any] = item.get("metadata", {})
    spec: Mapping[str, Any] = item.get("spec", {})
    status: Mapping[str, Any] = item.get("status", {})
    cap: Mapping[str, Any] = spec.get("capacity", {})
    agents: Mapping[str, Any] = status.get("agents", {})
    slots: Mapping[str, Any] = status.get("slots", {})
    _fields(
        [
            ("Name", meta.get("name")),
            ("Namespace", meta.get("namespace")),
            ("UID", meta.get("uid")),
            ("Created", meta.get("creationTimestamp")),
            ("Runtime", spec.get("runtime")),
            ("Agents min/max", f"{cap.get('poolMin', 0)}/{cap.get('poolMax', 0)}"),
            ("Free slots min/max", f"{cap.get('bufferMin', 0)}/{cap.get('bufferMax', 0)}"),
            ("Per agent", spec.get("maxSandboxesPerAgent")),
            ("Prewarm images", ", ".join(spec.get("prewarmImages", []))),
            (
                "Agents",
                f"{agents.get('ready', 0)} ready / {agents.get('total', 0)} total",
            ),
            ("Slots", f"{slots.get('allocated', 0)} allocated / {slots.get('total', 0)} total"),
            ("Cached images", ", ".join(status.get("cachedImages", []))),
        ]
    )
