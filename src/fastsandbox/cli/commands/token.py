"""`fsb token create|list|revoke`: tenant tokens, each scoped to one namespace (admin only).

`create` prints the new token as its last line, alone, so `fsb token create -n team-a | tail -1
> team-a.token` captures it; it is shown this once (the server keeps only its hash).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated

import typer

from fastsandbox.cli.options import Endpoint, Output, OutputOpt, TokenFile

if TYPE_CHECKING:
    from fastsandbox.sdk.sync import Client

app = typer.Typer(help="Manage tenant API tokens (needs the admin token).", no_args_is_help=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, flag: str = "--ttl") -> int:
    """`90`, `90s`, `30m`, `12h`, `7d` → seconds; InvalidArgument naming `flag` otherwise."""
    from fastsandbox.errors import InvalidArgument

    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if match is None or int(match.group(1)) <= 0:
        raise InvalidArgument(f"{flag}: {text!r} is not a positive duration (e.g. 3600, 30m, 7d)")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def _client(endpoint: str | None, token_file: str | None) -> Client:
    from fastsandbox.cli.options import client

    return client(endpoint, token_file, None)


@app.command("create")
def create(
    namespace: Annotated[
        str,
        typer.Option(
            "-n",
            "--namespace",
            metavar="NS",
            help="The one namespace the token may act in.",
            show_default=False,
        ),
    ],
    ttl: Annotated[
        str | None,
        typer.Option("--ttl", metavar="DURATION", help="Expire after this long (e.g. 30m, 7d)."),
    ] = None,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
) -> None:
    """Make a token for NAMESPACE; prints its id, then the token itself as the last line."""
    seconds = parse_duration(ttl) if ttl is not None else None
    with _client(endpoint, token_file) as fsb:
        info, token = fsb.create_token(namespace, ttl=seconds)
    expires = info.expires or "never"
    typer.echo(f"token {info.id} for namespace {info.namespace} (expires {expires}):", err=True)
    typer.echo(token)


@app.command("list")
def list_(
    output: OutputOpt = Output.table,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
) -> None:
    """ID, NAMESPACE, CREATED, EXPIRES of every tenant token (never the secret)."""
    from dataclasses import asdict

    from fastsandbox.cli import render

    with _client(endpoint, token_file) as fsb:
        tokens = fsb.list_tokens()
    if output is Output.table:
        render.token_table([(t.id, t.namespace, t.created, t.expires or "never") for t in tokens])
    else:
        render.structured({"items": [asdict(t) for t in tokens]}, output)


@app.command("revoke", no_args_is_help=True)
def revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="From `fsb token list`.")],
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
) -> None:
    """Revoke a token: calls carrying it are refused from now on."""
    with _client(endpoint, token_file) as fsb:
        fsb.revoke_token(token_id)
    typer.echo(f"token {token_id} revoked")
