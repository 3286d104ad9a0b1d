"""`fsb delete NAME [--wait]`: remove a sandbox (container, snapshot, then the record)."""

from __future__ import annotations

from typing import Annotated

import typer

from fastsandbox.cli.options import Endpoint, Namespace, SandboxName, TokenFile, client


def delete(
    name: SandboxName,
    wait: Annotated[
        bool, typer.Option("--wait", help="Return only once the container and record are gone.")
    ] = False,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Delete a sandbox."""
    with client(endpoint, token_file, namespace) as fsb:
        phase = fsb.delete(name, wait=wait)
    if wait or phase in ("", "Deleted"):
        typer.echo(f"sandbox {name} deleted")
    else:
        typer.echo(f"sandbox {name} deletion started ({phase}); `--wait` waits until it is gone")
