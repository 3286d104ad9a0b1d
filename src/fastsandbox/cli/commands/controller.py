"""`fsb controller`: the control plane on Kubernetes, one of several replicas behind a Lease."""

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
    ServeTokenFile,
    TlsCert,
    TlsKey,
    log_settings,
    serve_security,
)
from fastsandbox.settings import DEFAULT_ENDPOINT


def controller(
    *,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            "--kubeconfig",
            metavar="PATH",
            help="Kubeconfig file (default: $KUBECONFIG, else the in-cluster service account).",
            show_default=False,
        ),
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace",
            envvar="FSB_CONTROLLER_NAMESPACE",
            metavar="NS",
            help="The controller's namespace: its Lease and token Secrets (default: the "
            "kubeconfig context's, or the service account's).",
            show_default=False,
        ),
    ] = None,
    watch_namespace: Annotated[
        str | None,
        typer.Option(
            "--watch-namespace",
            metavar="NS",
            help="Adopt agent Pods of this namespace only (default: every namespace).",
            show_default=False,
        ),
    ] = None,
    listen: Listen = DEFAULT_ENDPOINT,
    token_file: ServeTokenFile = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    tls_name: Annotated[
        list[str] | None,
        typer.Option(
            "--tls-name",
            metavar="NAME",
            help="Another DNS name or IP for the generated certificate (repeatable).",
        ),
    ] = None,
    insecure: Insecure = False,
    agent_image: Annotated[
        str,
        typer.Option(
            "--agent-image", envvar="FSB_AGENT_IMAGE", metavar="IMAGE", help="Agent Pod image."
        ),
    ] = "fastsandbox/fastsandbox:0.1.0",
    identity: Annotated[
        str | None,
        typer.Option(
            "--identity",
            envvar="FSB_IDENTITY",
            metavar="ID",
            help="This replica's name in the leader Lease (default: <hostname>-<random>).",
            show_default=False,
        ),
    ] = None,
    lease_duration: Annotated[
        int,
        typer.Option(
            "--lease-duration",
            envvar="FSB_LEASE_DURATION",
            metavar="SECONDS",
            help="Leader Lease duration; a dead leader is replaced within about 4/3 of it.",
        ),
    ] = 15,
    allowed_registry: AllowedRegistries = None,
    insecure_registry: InsecureRegistries = None,
    node_containerd_state: Annotated[
        Path,
        typer.Option(
            "--node-containerd-state",
            metavar="DIR",
            help="The nodes' containerd state dir (its config's `state`): the agent Pods' "
            "containerd shim mounts each sandbox's size-limited writable layer under it.",
        ),
    ] = Path("/run/containerd"),
    heartbeat: Annotated[
        float,
        typer.Option(
            "--heartbeat", metavar="SECONDS", help="How often each agent's Status is polled."
        ),
    ] = 1.0,
    kube_auth: Annotated[
        bool,
        typer.Option(
            "--kube-auth/--no-kube-auth",
            help="Also accept Kubernetes tokens (ServiceAccounts) on the Fast-Path, checked with "
            "TokenReview and authorized per call with SubjectAccessReview on sandboxes and "
            "sandboxpools (fastsandbox.io).",
        ),
    ] = True,
    log_level: LogLevel = "info",
    log_format: LogFormat = "auto",
    log_file: LogFile = None,
    metrics_listen: MetricsListen = None,
) -> None:
    """Run the control plane on Kubernetes (prints `ready` when serving the Fast-Path)."""
    from fastsandbox.errors import InvalidArgument
    from fastsandbox.settings import ControllerSettings

    log = log_settings(log_level, log_format, log_file)
    if lease_duration < 2:
        raise InvalidArgument(f"--lease-duration: must be >= 2 seconds, not {lease_duration}")
    if heartbeat <= 0:
        raise InvalidArgument(f"--heartbeat: must be > 0 seconds, not {heartbeat}")
    if kubeconfig is not None and not kubeconfig.is_file():
        raise InvalidArgument(f"--kubeconfig: {kubeconfig} is not a file")
    token, cert, key = serve_security(token_file, tls_cert, tls_key, insecure, listen)
    settings = ControllerSettings(
        tls_cert=cert,
        tls_key=key,
        tls_names=list(tls_name or []),
        insecure=insecure,
        kubeconfig=kubeconfig.expanduser().absolute() if kubeconfig is not None else None,
        namespace=namespace or None,
        watch_namespace=watch_namespace or None,
        listen=listen,
        token=token,
        kube_auth=kube_auth,
        agent_image=agent_image,
        identity=identity or None,
        lease_duration_seconds=lease_duration,
        insecure_registries=list(insecure_registry or []),
        allowed_registries=list(allowed_registry or []),
        heartbeat_seconds=heartbeat,
        node_containerd_state=node_containerd_state,
        log=log,
        metrics_listen=metrics_listen,
    )

    from fastsandbox.controller import main as controller_main  # heavy: only when serving

    raise typer.Exit(controller_main(settings))
