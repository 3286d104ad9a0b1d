"""`fsb run`: create a sandbox and print where it runs (pinned contract: see the README)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from fastsandbox.cli.options import Endpoint, Namespace, Output, OutputOpt, TokenFile, client

_SPEC = "Sandbox spec"


def run(
    name: Annotated[str, typer.Argument(help="Sandbox name (a DNS label).", show_default=False)],
    command: Annotated[
        list[str] | None,
        typer.Argument(
            help="After `--`: the command and its arguments (replaces the image's entrypoint "
            "and cmd). Default: the image's.",
            show_default=False,
        ),
    ] = None,
    *,
    image: Annotated[
        str | None, typer.Option("--image", help="Image reference.", rich_help_panel=_SPEC)
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option("--pool", help="Pool (default: default-pool).", rich_help_panel=_SPEC),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "-e",
            "--env",
            metavar="K=V",
            help="Environment variable (repeatable).",
            rich_help_panel=_SPEC,
        ),
    ] = None,
    workdir: Annotated[
        str | None,
        typer.Option(
            "-w",
            "--workdir",
            "--working-dir",
            metavar="DIR",
            help="Working directory (absolute).",
            rich_help_panel=_SPEC,
        ),
    ] = None,
    port: Annotated[
        list[int] | None,
        typer.Option(
            "-p", "--port", metavar="PORT", help="Exposed port (repeatable).", rich_help_panel=_SPEC
        ),
    ] = None,
    ttl: Annotated[
        int | None,
        typer.Option(
            "--ttl",
            metavar="SECONDS",
            help="Expire after this many seconds.",
            rich_help_panel=_SPEC,
        ),
    ] = None,
    expire_time: Annotated[
        str | None,
        typer.Option(
            "--expire-time", metavar="RFC3339", help="Expire at this time.", rich_help_panel=_SPEC
        ),
    ] = None,
    failure_policy: Annotated[
        str | None,
        typer.Option(
            "--failure-policy",
            metavar="Manual|AutoRecreate",
            help="What to do when its agent is lost (default: Manual).",
            rich_help_panel=_SPEC,
        ),
    ] = None,
    recovery_timeout: Annotated[
        int | None,
        typer.Option(
            "--recovery-timeout",
            metavar="SECONDS",
            help="How long a lost agent may take to come back (default: 60).",
            rich_help_panel=_SPEC,
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            metavar="fast|strong",
            help="fast: answer, then persist; strong: persist first (default: fast).",
            rich_help_panel=_SPEC,
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "-l", "--label", metavar="K=V", help="Label (repeatable).", rich_help_panel=_SPEC
        ),
    ] = None,
    cpu: Annotated[
        str | None, typer.Option("--cpu", help="CPU limit, e.g. 500m.", rich_help_panel=_SPEC)
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option("--memory", help="Memory limit, e.g. 256Mi.", rich_help_panel=_SPEC),
    ] = None,
    pids: Annotated[
        int | None,
        typer.Option("--pids", help="Process limit, e.g. 256.", rich_help_panel=_SPEC),
    ] = None,
    disk: Annotated[
        str | None, typer.Option("--disk", help="Disk limit, e.g. 1Gi.", rich_help_panel=_SPEC)
    ] = None,
    lease: Annotated[
        int | None,
        typer.Option(
            "--lease",
            metavar="SECONDS",
            help="Delete the sandbox unless its lease is renewed (RenewLease, e.g. by the SDK) "
            "at least every SECONDS; `fsb run` itself does not renew.",
            rich_help_panel=_SPEC,
        ),
    ] = None,
    pull_user: Annotated[
        str | None,
        typer.Option(
            "--pull-user",
            metavar="USER",
            help="Registry user for a private image; the password is read from "
            "$FSB_PULL_PASSWORD (never from argv).",
            rich_help_panel=_SPEC,
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key", help="Retry-safe create: same key + spec = same sandbox."
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "-f",
            "--file",
            metavar="FILE.yaml",
            help="Read a Sandbox object or spec keys from YAML; flags override it.",
        ),
    ] = None,
    output: OutputOpt = Output.table,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Create a sandbox and print its agent, container, endpoints and timings."""
    from fastsandbox.cli import render, runfile
    from fastsandbox.errors import InvalidArgument
    from fastsandbox.sdk._core import env_list

    options: dict[str, Any] = runfile.load(file) if file is not None else {}
    flags: dict[str, Any] = {
        "image": image,
        "pool": pool,
        "working_dir": workdir,
        "ports": port or None,
        "ttl": ttl,
        "expire_time": expire_time,
        "failure_policy": failure_policy,
        "recovery_timeout": recovery_timeout,
        "mode": mode,
        "idempotency_key": idempotency_key,
        "namespace": namespace,
        "lease": lease,
    }
    options.update({k: v for k, v in flags.items() if v is not None})
    # One expiry flag replaces the file's other one; both flags together are refused later.
    if ttl is not None and expire_time is None:
        options.pop("expire_time", None)
    if expire_time is not None and ttl is None:
        options.pop("ttl", None)
    if env:
        merged = {e["name"]: e["value"] for e in env_list(options.get("env"))}
        for i, item in enumerate(env):
            key, sep, value = item.partition("=")
            if not sep:
                raise InvalidArgument(f"-e {item!r}: expected K=V (spec.env[{i}])")
            merged.pop(key, None)  # a flag moves the variable to the end, as given
            merged[key] = value
        options["env"] = [{"name": k, "value": v} for k, v in merged.items()]
    if label:
        labels = dict(options.get("labels") or {})
        for item in label:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidArgument(f"-l {item!r}: expected K=V")
            labels[key] = value
        options["labels"] = labels
    limits = {"cpu": cpu, "memory": memory, "pids": pids, "disk": disk}
    if any(v is not None for v in limits.values()):
        resources = dict(options.get("resources") or {})
        resources.update({k: v for k, v in limits.items() if v is not None})
        options["resources"] = resources
    if command:
        options["command"], options["args"] = list(command), []
    if pull_user is not None:
        password = os.environ.get("FSB_PULL_PASSWORD", "")
        if not password:
            raise InvalidArgument("--pull-user: set the password in $FSB_PULL_PASSWORD")
        options["pull_credentials"] = (pull_user, password)

    image_ref = str(options.pop("image", "") or "")
    from fastsandbox.cli.pull_progress import pull_progress

    with (
        client(endpoint, token_file, namespace) as fsb,
        pull_progress(fsb, image_ref, options) as progress,
    ):
        result = fsb.create(name, image_ref, **options)
        progress.done(result.timings.pulled_ms)
    if output is Output.table:
        render.created(result)
    else:
        from fastsandbox.api.models import to_wire

        render.structured(to_wire(result.object), output)
