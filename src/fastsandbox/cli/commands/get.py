"""`fsb get NAME`: one sandbox, readable or as the API object (`-o json|yaml`)."""

from __future__ import annotations

from fastsandbox.cli.options import (
    Endpoint,
    Namespace,
    Output,
    OutputOpt,
    SandboxName,
    TokenFile,
    client,
)


def get(
    name: SandboxName,
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
