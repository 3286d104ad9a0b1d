"""`fsb reset NAME`: recreate a sandbox's container from the same spec with a fresh rootfs.

The command sets a new `spec.resetRevision` and returns; the control plane replaces the container
and then sets `status.observedResetRevision` to the same value.
"""

from __future__ import annotations

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


def reset(
    name: SandboxName,
    output: OutputOpt = Output.table,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Recreate a sandbox's container (same spec, fresh filesystem)."""
    from fastsandbox.api.models import to_wire
    from fastsandbox.cli import render

    with client(endpoint, token_file, namespace) as fsb:
        sb = fsb.reset(name)
    if output is not Output.table:
        render.structured(to_wire(sb), output)
        return
    typer.echo(
        f"sandbox {sb.metadata.namespace}/{sb.metadata.name} reset triggered "
        f"(revision {sb.spec.reset_revision}); `fsb get {sb.metadata.name}` shows the new "
        "container once status.observedResetRevision matches"
    )
