"""`fsb update NAME`: change a sandbox's expiry, labels, failure policy or recovery timeout.

Only what is given changes. `--label k=v` adds or overwrites a label and `--label k-` removes one
(kubectl's spelling); the expiry flags are mutually exclusive.
"""

from __future__ import annotations

from typing import Annotated

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


def parse_labels(items: list[str]) -> dict[str, str | None]:
    """`k=v` sets, `k-` removes (None); anything else is an error naming the flag."""
    from fastsandbox.errors import InvalidArgument

    labels: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key:
            labels[key] = value
        elif not sep and len(item) > 1 and item.endswith("-"):
            labels[item[:-1]] = None
        else:
            raise InvalidArgument(f"--label {item!r}: expected K=V to set or K- to remove")
    return labels


def update(
    name: SandboxName,
    *,
    ttl: Annotated[
        int | None,
        typer.Option("--ttl", metavar="SECONDS", help="Expire this many seconds from now."),
    ] = None,
    expire_time: Annotated[
        str | None,
        typer.Option("--expire-time", metavar="RFC3339", help="Expire at this time."),
    ] = None,
    no_expiry: Annotated[
        bool, typer.Option("--no-expiry", help="Never expire (clears the expire time).")
    ] = False,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "-l",
            "--label",
            metavar="K=V|K-",
            help="Set a label (K=V) or remove one (K-); repeatable. Other labels are kept.",
        ),
    ] = None,
    failure_policy: Annotated[
        str | None,
        typer.Option(
            "--failure-policy",
            metavar="Manual|AutoRecreate",
            help="What to do when its agent is lost.",
        ),
    ] = None,
    recovery_timeout: Annotated[
        int | None,
        typer.Option(
            "--recovery-timeout",
            metavar="SECONDS",
            help="How long a lost agent may take to come back.",
        ),
    ] = None,
    output: OutputOpt = Output.table,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Change a sandbox's expiry, labels, failure policy or recovery timeout."""
    from fastsandbox.cli import render
    from fastsandbox.errors import InvalidArgument

    expiry = [
        flag
        for flag, given in (
            ("--ttl", ttl is not None),
            ("--expire-time", expire_time is not None),
            ("--no-expiry", no_expiry),
        )
        if given
    ]
    if len(expiry) > 1:
        raise InvalidArgument(f"{' and '.join(expiry)} are mutually exclusive: give one")
    labels = parse_labels(label or [])
    with client(endpoint, token_file, namespace) as fsb:
        sb = fsb.update(
            name,
            ttl=ttl,
            expire_time=expire_time,
            no_expiry=no_expiry,
            labels=labels or None,
            failure_policy=failure_policy,
            recovery_timeout=recovery_timeout,
        )
    from fastsandbox.api.models import to_wire

    wire = to_wire(sb)
    if output is not Output.table:
        render.structured(wire, output)
        return
    spec = wire.get("spec", {})
    labels_text = ",".join(f"{k}={v}" for k, v in sb.metadata.labels.items()) or "<none>"
    typer.echo(
        f"sandbox {sb.metadata.namespace}/{sb.metadata.name} updated: "
        f"expires {spec.get('expireTime') or 'never'}, labels {labels_text}, "
        f"failure policy {spec.get('failurePolicy')}, "
        f"recovery timeout {spec.get('recoveryTimeoutSeconds')}s"
    )
