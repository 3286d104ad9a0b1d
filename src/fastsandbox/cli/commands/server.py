"""`fsb server`: the embedded control plane, its agents and (if needed) its own containerd."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def server(
    *,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar="FSB_DATA_DIR",
            metavar="DIR",
            help="State, token and logs (default: ~/.local/share/fastsandbox).",
            show_default=False,
        ),
    ] = None,
    listen: Annotated[
        str,
        typer.Option(
            "--listen", envvar="FSB_LISTEN", metavar="HOST:PORT", help="Fast-Path address."
        ),
    ] = "127.0.0.1:9090",
    containerd_socket: Annotated[
        Path | None,
        typer.Option(
            "--containerd-socket",
            envvar="FSB_CONTAINERD_SOCKET",
            metavar="PATH",
            help="Use this containerd (default: the system one if it answers, else our own).",
            show_default=False,
        ),
    ] = None,
    insecure_registry: Annotated[
        list[str] | None,
        typer.Option(
            "--insecure-registry", metavar="HOST:PORT", help="Pull over plain HTTP (repeatable)."
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="FSB_TOKEN",
            help="Require this API token (default: <data-dir>/token, created once).",
            show_default=False,
        ),
    ] = None,
    no_default_pool: Annotated[
        bool, typer.Option("--no-default-pool", help="Do not create pool default-pool.")
    ] = False,
    network: Annotated[
        str,
        typer.Option(
            "--network",
            envvar="FSB_NETWORK",
            metavar="auto|cni|host",
            help="Agent networking: CNI bridge per agent, or the host's.",
        ),
    ] = "auto",
    log_level: Annotated[
        str, typer.Option("--log-level", envvar="FSB_LOG_LEVEL", metavar="debug|info|warning|error")
    ] = "info",
    log_format: Annotated[
        str, typer.Option("--log-format", envvar="FSB_LOG_FORMAT", metavar="auto|json|console")
    ] = "auto",
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log-file",
            envvar="FSB_LOG_FILE",
            metavar="PATH",
            help="Also write JSON logs here, size-rotated.",
        ),
    ] = None,
    orphan_timeout: Annotated[
        float,
        typer.Option(
            "--orphan-timeout",
            envvar="FSB_ORPHAN_TIMEOUT",
            metavar="SECONDS",
            help="Remove a container left without a record (or agent) this long.",
        ),
    ] = 30.0,
    janitor_interval: Annotated[
        float,
        typer.Option(
            "--janitor-interval",
            envvar="FSB_JANITOR_INTERVAL",
            metavar="SECONDS",
            help="How often the janitor looks for orphans.",
        ),
    ] = 10.0,
) -> None:
    """Run the control plane and its agents on this machine (prints `ready` when serving)."""
    from fastsandbox.errors import InvalidArgument
    from fastsandbox.settings import LogSettings, ServerSettings

    if network not in ("auto", "cni", "host"):
        raise InvalidArgument(f"--network: must be auto, cni or host, not {network!r}")
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise InvalidArgument(
            f"--log-level: must be debug, info, warning or error, not {log_level!r}"
        )
    if log_format not in ("auto", "json", "console"):
        raise InvalidArgument(f"--log-format: must be auto, json or console, not {log_format!r}")
    if orphan_timeout < 0:
        raise InvalidArgument(f"--orphan-timeout: must be >= 0 seconds, not {orphan_timeout}")
    if janitor_interval <= 0:
        raise InvalidArgument(f"--janitor-interval: must be > 0 seconds, not {janitor_interval}")
    settings = ServerSettings(
        listen=listen,
        containerd_socket=containerd_socket,
        insecure_registries=list(insecure_registry or []),
        token=token,
        default_pool=not no_default_pool,
        network=network,
        log=LogSettings(level=log_level.lower(), format=log_format, file=log_file),
        janitor_interval_seconds=janitor_interval,
        orphan_timeout_seconds=orphan_timeout,
    )
    if data_dir is not None:
        settings.data_dir = data_dir.expanduser().absolute()

    from fastsandbox.server import main as server_main  # heavy: only when serving

    raise typer.Exit(server_main(settings))
