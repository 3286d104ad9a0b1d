"""`fsb describe NAME`: one sandbox the way `kubectl describe` shows a Pod — metadata, spec,
status, conditions and its recent events (oldest first) — or, with `-o json|yaml`,
`{"object": <the API object>, "events": [<Event>...]}` for scripts.

Rendering is a pure function of the wire dicts (`describe_text`), so its output is tested as a
string; the command only fetches the object and its events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import typer

from fastsandbox.cli.options import (
    Endpoint,
    Namespace,
    Output,
    OutputOpt,
    SandboxName,
    TokenFile,
    client,
)

NONE = "<none>"
_INDENT = "  "
# kubectl's look: three spaces between table columns.
_GAP = "   "


def describe(
    name: SandboxName,
    output: OutputOpt = Output.table,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Show one sandbox in detail, with its recent events."""
    from fastsandbox.cli import render

    with client(endpoint, token_file, namespace) as fsb:
        item = fsb.get_raw(name)
        events = fsb.events_raw(name)
    if output is Output.table:
        typer.echo(describe_text(item, events), nl=False)
    else:
        render.structured({"object": item, "events": events}, output)


# --------------------------------------------------------------------------- rendering


def describe_text(
    item: Mapping[str, Any], events: Sequence[Mapping[str, Any]], now: datetime | None = None
) -> str:
    """The human view of a sandbox (wire form) and its events (wire form, oldest first)."""
    from fastsandbox.cli.render import age
    from fastsandbox.cli.render_plain import timings_text

    now = now or datetime.now(UTC)
    meta: Mapping[str, Any] = item.get("metadata", {})
    spec: Mapping[str, Any] = item.get("spec", {})
    status: Mapping[str, Any] = item.get("status", {})

    def when(timestamp: str | None, future: bool = False) -> str:
        if not timestamp:
            return NONE
        try:
            at = _parse(timestamp)
        except ValueError:
            return timestamp
        if future and at > now:
            return f"{timestamp} (in {age(now.isoformat(), at)})"
        return f"{timestamp} ({age(timestamp, now)} ago)"

    lines: list[str] = []
    lines += _fields(
        "",
        [
            ("Name", meta.get("name", "")),
            ("Namespace", meta.get("namespace", "")),
            ("UID", meta.get("uid") or NONE),
            ("Labels", _pairs(meta.get("labels", {}))),
            ("Annotations", _pairs(meta.get("annotations", {}))),
            ("Finalizers", list(meta.get("finalizers", [])) or NONE),
            ("Created", when(meta.get("creationTimestamp"))),
        ]
        + (
            [("Deleting since", when(meta["deletionTimestamp"]))]
            if meta.get("deletionTimestamp")
            else []
        ),
    )
    resources = spec.get("resources") or {}
    lines.append("Spec:")
    lines += _fields(
        _INDENT,
        [
            ("Image", spec.get("image", "")),
            ("Pool", spec.get("poolRef", "")),
            ("Command", _argv(spec.get("command", []))),
            ("Args", _argv(spec.get("args", []))),
            ("Env", [f"{e.get('name')}={e.get('value', '')}" for e in spec.get("env", [])] or NONE),
            ("Working Dir", spec.get("workingDir") or NONE),
            ("Exposed Ports", ", ".join(str(p) for p in spec.get("exposedPorts", [])) or NONE),
            ("Expire Time", when(spec.get("expireTime"), future=True)),
            ("Failure Policy", spec.get("failurePolicy", "")),
            (
                "Recovery Timeout",
                f"{spec['recoveryTimeoutSeconds']}s" if "recoveryTimeoutSeconds" in spec else NONE,
            ),
            ("Reset Revision", spec.get("resetRevision") or NONE),
            (
                "Resources",
                ", ".join(f"{k}={v}" for k, v in resources.items()) or "<server default>",
            ),
        ],
    )
    agent = status.get("assignedAgent") or ""
    if agent and status.get("agentIP"):
        agent += f" ({status['agentIP']})"
    lines.append("Status:")
    lines += _fields(
        _INDENT,
        [
            ("Phase", status.get("phase", "Pending")),
            ("Message", status.get("message") or NONE),
            ("Agent", agent or NONE),
            ("Container", status.get("containerID") or NONE),
            ("Endpoints", ", ".join(status.get("endpoints", [])) or NONE),
            ("Started", when(status.get("startedAt"))),
            ("Exit Code", str(status["exitCode"]) if status.get("exitCode") is not None else NONE),
            ("Observed Reset Revision", status.get("observedResetRevision") or NONE),
            ("Timings", timings_text(status.get("timings")) or NONE),
        ],
    )
    conditions = status.get("conditions", [])
    if conditions:
        lines.append("Conditions:")
        lines += _table(
            ["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"],
            [
                [
                    c.get("type", ""),
                    c.get("status", ""),
                    c.get("reason") or NONE,
                    age(c.get("lastTransitionTime"), now),
                    c.get("message", ""),
                ]
                for c in conditions
            ],
        )
    else:
        lines.append(f"Conditions:{_INDENT}{NONE}")
    if events:
        lines.append("Events:")
        lines += _table(
            ["AGE", "TYPE", "REASON", "MESSAGE"],
            [
                [
                    age(e.get("timestamp"), now)
                    + (f" (x{e['count']})" if e.get("count", 1) > 1 else ""),
                    e.get("type", ""),
                    e.get("reason", ""),
                    e.get("message", ""),
                ]
                for e in events
            ],
        )
    else:
        lines.append(f"Events:{_INDENT}{NONE}")
    return "\n".join(line.rstrip() for line in lines) + "\n"


Value = str | list[str]


def _fields(indent: str, pairs: Iterable[tuple[str, Value]]) -> list[str]:
    """`Key:  value` lines with the values aligned; a list value continues on the next lines,
    under the first."""
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0) + 2
    lines = []
    for key, value in pairs:
        values = value if isinstance(value, list) else [value]
        head = f"{indent}{key + ':':<{width}}"
        lines.append(head + (values[0] if values else NONE))
        lines += [" " * len(head) + more for more in values[1:]]
    return lines


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the last one is not padded."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers) - 1)]
    out = []
    for row in [headers, *rows]:
        cells = [f"{cell!s:<{widths[i]}}" for i, cell in enumerate(row[:-1])]
        out.append(_INDENT + _GAP.join([*cells, str(row[-1])]))
    return out


def _pairs(mapping: Mapping[str, str]) -> Value:
    return [f"{k}={v}" for k, v in sorted(mapping.items())] or NONE


def _argv(argv: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv) if argv else NONE


def _parse(timestamp: str) -> datetime:
    parsed = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
