"""`fsb get NAME`: one sandbox, readable or as the API object (`-o json|yaml`)."""

from __future__ import annotations

from typing import Annotated

import typer

from fastsandbox.cli.options import Endpoint, Namespace, Output, OutputOpt, TokenFile, client


def get(
    name: Annotated[str, typer.Argument(help="Sandbox name.", show_default=False)],
    output: OutputOpt = Output.table,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Show one sandbox."""
    from fastsandbox.cli import render

    with client(endpoint, token_file, namespace) as fsb:
        item = fsb.get_raw(name)
    if output is Output.table:
        render.sandbox_detail(item)
    else:
        render.structured(item, output)
