"""Options every verb shares, declared once, and the one way commands get a `Client`.

Only `typer` is imported at module level: `fsb` is called thousands of times by scripts, so grpc,
pydantic and rich are imported by the commands that need them, when they run.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from fastsandbox.sdk.sync import Client

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
        help="Fast-Path address of fsb server (default: config file, else 127.0.0.1:9090).",
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
