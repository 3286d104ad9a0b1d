"""`fsb server`: the embedded control plane, its agents and (if needed) its own containerd."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fastsandbox.cli.options import (
    AllowedRegistries,
    Insecure,
    InsecureRegistries,
    Listen,
    LogFile,
    LogFormat,
    LogLevel,
    MetricsListen,
    OrphanTimeout,
    ServeTokenFile,
    TlsCert,
    TlsKey,
    check_orphan_timeout,
    log_settings,
    serve_security,
)
from fastsandbox.settings import (
    DEFAULT_ENDPOINT,
    IMAGE_CACHE_MAX,
    JANITOR_INTERVAL_SECONDS,
    ORPHAN_TIMEOUT_SECONDS,
)


def server(
    *,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar="FSB_DATA_DIR",
            metavar="DIR",
            help="State, admin token, TLS CA and logs (default: ~/.local/share/fastsandbox).",
            show_default=False,
        ),
    ] = None,
    listen: Listen = DEFAULT_ENDPOINT,
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
    allowed_registry: AllowedRegistries = None,
    insecure_registry: InsecureRegistries = None,
    token_file: ServeTokenFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    insecure: Insecure = False,
    no_default_pool: Annotated[
        bool, typer.Option("--no-default-pool", help="Do not create pool default-pool.")
    ] = False,
    network: Annotated[
        str,
        typer.Option(
            "--network",
            envvar="FSB_NETWORK",
            metavar="cni|host",
            help="Agent networking: a CNI bridge namespace per agent (and per sandbox in "
            "private pools), or the host's (no isolation; only when you mean it). No fallback: "
            "if cni cannot be set up, agents do not start.",
        ),
    ] = "cni",
    log_level: LogLevel = "info",
    log_format: LogFormat = "auto",
    log_file: LogFile = None,
    metrics_listen: MetricsListen = None,
    orphan_timeout: OrphanTimeout = ORPHAN_TIMEOUT_SECONDS,
    image_cache_max: Annotated[
        str,
        typer.Option(
            "--image-cache-max",
            envvar="FSB_IMAGE_CACHE_MAX",
            metavar="SIZE",
            help="Image cache budget; least recently used images go past it.",
        ),
    ] = IMAGE_CACHE_MAX,
    janitor_interval: Annotated[
        float,
        typer.Option(
            "--janitor-interval",
            envvar="FSB_JANITOR_INTERVAL",
            metavar="SECONDS",
            help="How often the janitor looks for orphans.",
        ),
    ] = JANITOR_INTERVAL_SECONDS,
    fault_store_delay_file: Annotated[
        Path | None,
        typer.Option(
            "--fault-store-delay-file",
            hidden=True,  # the fault suite's slow disk (store/faults.py), not for production
            metavar="PATH",
        ),
    ] = None,
) -> None:
    """Run the control plane and its agents on this machine (prints `ready` when serving)."""
    from fastsandbox.errors import InvalidArgument
    from fastsandbox.settings import ServerSettings

    if network not in ("auto", "cni", "host"):
        raise InvalidArgument(f"--network: must be cni or host, not {network!r}")
    log = log_settings(log_level, log_format, log_file)
    check_orphan_timeout(orphan_timeout)
    if janitor_interval <= 0:
        raise InvalidArgument(f"--janitor-interval: must be > 0 seconds, not {janitor_interval}")
    token, cert, key = serve_security(token_file, tls_cert, tls_key, insecure, listen)
    from fastsandbox.api.quantity import bytes_exact

    try:
        cache_max = int(bytes_exact(image_cache_max))
    except ValueError:
        raise InvalidArgument(
            f"--image-cache-max: {image_cache_max!r} is not a size such as 20Gi"
        ) from None
    if cache_max <= 0:
        raise InvalidArgument("--image-cache-max: must be positive (there is no unlimited)")
    settings = ServerSettings(
        listen=listen,
        tls_cert=cert,
        tls_key=key,
        insecure=insecure,
        containerd_socket=containerd_socket,
        insecure_registries=list(insecure_registry or []),
        allowed_registries=list(allowed_registry or []),
        token=token,
        default_pool=not no_default_pool,
        network=network,
        log=log,
        metrics_listen=metrics_listen,
        janitor_interval_seconds=janitor_interval,
        orphan_timeout_seconds=orphan_timeout,
        image_cache_max_bytes=cache_max,
        fault_store_delay_file=fault_store_delay_file,
    )
    if data_dir is not None:
        settings.data_dir = data_dir.expanduser().absolute()

    from fastsandbox.server import main as server_main  # heavy: only when serving

    raise typer.Exit(server_main(settings))
