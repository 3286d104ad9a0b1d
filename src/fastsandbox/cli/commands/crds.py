"""`fsb crds`: the CustomResourceDefinitions generated from the models, for `kubectl apply`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def crds(
    *,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Write one file per CRD into DIR (e.g. deploy/crds) instead of printing them.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print the Sandbox and SandboxPool CRDs as YAML (`fsb crds | kubectl apply -f -`)."""
    from fastsandbox.api import crds as generated

    if out is None:
        typer.echo("".join(generated.rendered().values()), nl=False)
        return
    for path in generated.write(out):
        typer.echo(str(path))
