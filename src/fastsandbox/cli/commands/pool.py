"""`fsb pool create|list|get|scale|delete`: warm pools of agents and their capacity rules."""

from __future__ import annotations

from typing import Annotated

import typer

from fastsandbox.cli.options import (
    AllNamespaces,
    Endpoint,
    Namespace,
    Output,
    OutputOpt,
    TokenFile,
    client,
)

app = typer.Typer(help="Manage sandbox pools.", no_args_is_help=True)

Name = Annotated[str, typer.Argument(help="Pool name.", show_default=False)]


@app.command("create")
def create(
    name: Name,
    *,
    runtime: Annotated[
        str | None,
        typer.Option("--runtime", metavar="runc|gvisor", help="Container runtime (default: runc)."),
    ] = None,
    pool_min: Annotated[
        int | None, typer.Option("--min", help="Fewest agents (default: 1).")
    ] = None,
    pool_max: Annotated[
        int | None, typer.Option("--max", help="Most agents (default: --min).")
    ] = None,
    buffer_min: Annotated[
        int | None, typer.Option("--buffer-min", help="Keep at least this many free slots.")
    ] = None,
    buffer_max: Annotated[
        int | None, typer.Option("--buffer-max", help="Keep at most this many free slots.")
    ] = None,
    per_agent: Annotated[
        int | None, typer.Option("--per-agent", help="Sandboxes per agent (default: 5).")
    ] = None,
    prewarm_image: Annotated[
        list[str] | None,
        typer.Option(
            "--prewarm-image",
            metavar="IMAGE",
            help="Pull on every agent, and keep warm slots of it (repeatable).",
        ),
    ] = None,
    warm_slots: Annotated[
        int | None,
        typer.Option(
            "--warm-slots",
            min=0,
            help="Warm slots per agent and hot image: containers made ahead that a create of "
            "that image claims in milliseconds (default: 0).",
        ),
    ] = None,
    network_mode: Annotated[
        str | None,
        typer.Option(
            "--network-mode",
            metavar="private|shared",
            help="private (default): a network namespace per sandbox; shared: the agent's.",
        ),
    ] = None,
    egress: Annotated[
        str | None,
        typer.Option(
            "--egress", metavar="none|allow", help="Outbound traffic of private sandboxes."
        ),
    ] = None,
    egress_allow: Annotated[
        list[str] | None,
        typer.Option(
            "--egress-allow",
            metavar="CIDR",
            help="With --egress allow: only to this IPv4 CIDR (repeatable).",
        ),
    ] = None,
    output: OutputOpt = Output.table,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Create a pool."""
    from typing import Any

    from fastsandbox.cli import render

    options: dict[str, Any] = {
        k: v
        for k, v in {
            "runtime": runtime,
            "pool_min": pool_min,
            "pool_max": pool_max,
            "buffer_min": buffer_min,
            "buffer_max": buffer_max,
            "per_agent": per_agent,
            "prewarm_images": prewarm_image,
            "warm_slots": warm_slots,
            "network_mode": network_mode,
            "egress": egress,
            "egress_allow": egress_allow,
        }.items()
        if v is not None
    }
    with client(endpoint, token_file, namespace) as fsb:
        pool = fsb.create_pool(name, **options)
    if output is Output.table:
        typer.echo(f"pool {pool.metadata.namespace}/{pool.metadata.name} created")
    else:
        from fastsandbox.api.models import to_wire

        render.structured(to_wire(pool), output)


@app.command("list")
def list_(
    all_namespaces: AllNamespaces = False,
    output: OutputOpt = Output.table,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """List pools."""
    from fastsandbox.cli import render

    with client(endpoint, token_file, namespace) as fsb:
        items = fsb.list_pools_raw(all_namespaces=all_namespaces)
    if output is Output.table:
        render.pool_table(items, all_namespaces)
    else:
        render.structured({"items": items}, output)


@app.command("get")
def get(
    name: Name,
    output: OutputOpt = Output.table,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Show one pool."""
    from fastsandbox.cli import render

    with client(endpoint, token_file, namespace) as fsb:
        item = fsb.get_pool_raw(name)
    if output is Output.table:
        render.pool_detail(item)
    else:
        render.structured(item, output)


@app.command("scale")
def scale(
    name: Name,
    *,
    pool_min: Annotated[int, typer.Option("--min", help="Fewest agents.", show_default=False)],
    pool_max: Annotated[
        int | None,
        typer.Option("--max", help="Most agents (default: unchanged, raised to --min if lower)."),
    ] = None,
    output: OutputOpt = Output.table,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Change a pool's agent bounds; agents are started or drained in the background."""
    from fastsandbox.cli import render

    with client(endpoint, token_file, namespace) as fsb:
        pool = fsb.scale_pool(name, pool_min=pool_min, pool_max=pool_max)
    if output is Output.table:
        cap = pool.spec.capacity
        typer.echo(
            f"pool {pool.metadata.namespace}/{pool.metadata.name} scaled "
            f"(min {cap.pool_min}, max {cap.pool_max})"
        )
    else:
        from fastsandbox.api.models import to_wire

        render.structured(to_wire(pool), output)


@app.command("delete")
def delete(
    name: Name,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Delete a pool (its agents are stopped)."""
    with client(endpoint, token_file, namespace) as fsb:
        fsb.delete_pool(name)
    typer.echo(f"pool {name} deleted")
