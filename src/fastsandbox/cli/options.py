"""Options every verb shares, declared once, and the one way commands get a `Client`.

Only `typer` is imported at module level: `fsb` is called thousands of times by scripts, so grpc,
pydantic and rich are imported by the commands that need them, when they run.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

from fastsandbox.settings import DEFAULT_ENDPOINT

if TYPE_CHECKING:
    from pathlib import Path

    from fastsandbox.sdk.sync import Client
    from fastsandbox.settings import LogSettings

CLIENT_PANEL = "Client options"


class Output(StrEnum):
    """`table` is the human view; `json` and `yaml` print the API object for scripts."""

    table = "table"
    json = "json"
    yaml = "yaml"


Endpoint = Annotated[
    str | None,
    typer.Option(
        "--endpoint",
        envvar="FSB_ENDPOINT",
        metavar="HOST:PORT",
        help=f"Fast-Path address of fsb server (default: config file, else {DEFAULT_ENDPOINT}).",
        rich_help_panel=CLIENT_PANEL,
        show_default=False,
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="FSB_TOKEN",
        help="API token (default: config file, else the server's <data-dir>/token).",
        rich_help_panel=CLIENT_PANEL,
        show_default=False,
    ),
]
Namespace = Annotated[
    str | None,
    typer.Option(
        "-n",
        "--namespace",
        envvar="FSB_NAMESPACE",
        help="Namespace (default: config file, else `default`).",
        rich_help_panel=CLIENT_PANEL,
        show_default=False,
    ),
]
OutputOpt = Annotated[
    Output,
    typer.Option("-o", "--output", help="Output format: json/yaml print the API object."),
]
AllNamespaces = Annotated[
    bool, typer.Option("-A", "--all-namespaces", help="List across every namespace.")
]


def client(endpoint: str | None, token: str | None, namespace: str | None) -> Client:
    """A `Client` from the shared options (flags > `FSB_*` env > config file > defaults)."""
    from fastsandbox.sdk.sync import Client

    return Client(endpoint, token, namespace)


# Logging of the long-running commands (server, controller, janitor).
LogLevel = Annotated[
    str, typer.Option("--log-level", envvar="FSB_LOG_LEVEL", metavar="debug|info|warning|error")
]
LogFormat = Annotated[
    str, typer.Option("--log-format", envvar="FSB_LOG_FORMAT", metavar="auto|json|console")
]
LogFile = Annotated[
    "Path | None",
    typer.Option(
        "--log-file",
        envvar="FSB_LOG_FILE",
        metavar="PATH",
        help="Also write JSON logs here, size-rotated.",
    ),
]


def log_settings(level: str, format_: str, file: Path | None = None) -> LogSettings:
    """The validated log options, or InvalidArgument naming the flag."""
    from fastsandbox.errors import InvalidArgument
    from fastsandbox.settings import LogSettings

    if level.lower() not in ("debug", "info", "warning", "error"):
        raise InvalidArgument(f"--log-level: must be debug, info, warning or error, not {level!r}")
    if format_ not in ("auto", "json", "console"):
        raise InvalidArgument(f"--log-format: must be auto, json or console, not {format_!r}")
    return LogSettings(level=level.lower(), format=format_, file=file)


MetricsListen = Annotated[
    str | None,
    typer.Option(
        "--metrics-listen",
        envvar="FSB_METRICS_LISTEN",
        metavar="HOST:PORT",
        help="Serve /metrics (Prometheus), /healthz and /readyz on this address (off by default).",
    ),
]
