"""`fsb logs NAME [-f]`: the sandbox's output, byte for byte, flushed as it arrives."""

from __future__ import annotations

from typing import Annotated

import typer

from fastsandbox.cli.options import Endpoint, Namespace, Token, client


def logs(
    name: Annotated[str, typer.Argument(help="Sandbox name.", show_default=False)],
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep streaming until Ctrl-C or the end.")
    ] = False,
    endpoint: Endpoint = None,
    token: Token = None,
    namespace: Namespace = None,
) -> None:
    """Print a sandbox's stdout and stderr."""
    out = typer.get_binary_stream("stdout")
    with client(endpoint, token, namespace) as fsb:
        try:
            for chunk in fsb.logs(name, follow=follow):
                out.write(chunk)
                out.flush()
        except KeyboardInterrupt:
            pass  # Ctrl-C is how `-f` is meant to end: not a failure
