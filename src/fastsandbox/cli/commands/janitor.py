"""`fsb janitor --node NODE`: the janitor DaemonSet's entry point (one per Kubernetes node).

The composition root of the node janitor: the Kubernetes store and the agent-Pod lister are
built here and handed to `fastsandbox.janitor.kubernetes.run`, so the janitor package never
imports a store backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fastsandbox.cli.options import (
    LogFormat,
    LogLevel,
    OrphanTimeout,
    check_orphan_timeout,
    log_settings,
)
from fastsandbox.settings import CONTAINERD_SOCKET, JANITOR_INTERVAL_SECONDS, ORPHAN_TIMEOUT_SECONDS

if TYPE_CHECKING:
    from fastsandbox.janitor.kubernetes import NodeJanitorSettings


def janitor(
    *,
    node: Annotated[
        str,
        typer.Option(
            "--node",
            envvar="FSB_NODE_NAME",
            metavar="NODE",
            help="The node to clean (the DaemonSet passes spec.nodeName).",
            show_default=False,
        ),
    ],
    kubeconfig: Annotated[
        Path | None,
        typer.Option(
            "--kubeconfig",
            metavar="PATH",
            help="Kubeconfig file (default: $KUBECONFIG, else the Pod's service account).",
            show_default=False,
        ),
    ] = None,
    containerd_socket: Annotated[
        Path,
        typer.Option(
            "--containerd-socket",
            envvar="FSB_CONTAINERD_SOCKET",
            metavar="PATH",
            help="The node's containerd socket.",
        ),
    ] = CONTAINERD_SOCKET,
    containerd_namespace: Annotated[
        str,
        typer.Option(
            "--containerd-namespace",
            metavar="NAME",
            help="containerd namespace the agent Pods make sandboxes in.",
        ),
    ] = "k8s.io",
    agents_dir: Annotated[
        Path | None,
        typer.Option(
            "--agents-dir",
            metavar="DIR",
            help="The agents' host directory (<dir>/<pod>/logs/): sweeps stale logs.",
            show_default=False,
        ),
    ] = None,
    orphan_timeout: OrphanTimeout = ORPHAN_TIMEOUT_SECONDS,
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            envvar="FSB_JANITOR_INTERVAL",
            metavar="SECONDS",
            help="How often the janitor looks for orphans.",
        ),
    ] = JANITOR_INTERVAL_SECONDS,
    log_level: LogLevel = "info",
    log_format: LogFormat = "auto",
) -> None:
    """Remove what agent Pods on NODE left behind once their sandbox or agent is gone."""
    from fastsandbox.errors import InvalidArgument

    if not node:
        raise InvalidArgument("--node: required (the DaemonSet passes spec.nodeName)")
    check_orphan_timeout(orphan_timeout)
    if interval <= 0:
        raise InvalidArgument(f"--interval: must be > 0 seconds, not {interval}")
    log = log_settings(log_level, log_format)

    from fastsandbox.janitor.kubernetes import NodeJanitorSettings
    from fastsandbox.logconfig import configure

    settings = NodeJanitorSettings(
        node=node,
        containerd_socket=containerd_socket,
        containerd_namespace=containerd_namespace,
        agents_dir=agents_dir.absolute() if agents_dir else None,
        interval_seconds=interval,
        orphan_timeout_seconds=orphan_timeout,
    )
    configure(log, component="janitor")
    _serve(settings, kubeconfig)


def _serve(settings: NodeJanitorSettings, kubeconfig: Path | None) -> None:
    import asyncio

    from fastsandbox._aio.signals import run_until_stopped
    from fastsandbox._kube.config import make_client
    from fastsandbox.janitor.kubernetes import LightkubeAgentPods, run
    from fastsandbox.store.kubernetes import KubernetesStore

    async def main(stop: asyncio.Event) -> None:
        # Two clients: the store owns (and closes) its own; the Pod lister's is ours to close.
        store = await KubernetesStore.open(kubeconfig)
        pods_client = await make_client(kubeconfig)
        try:
            await run(settings, store, LightkubeAgentPods(pods_client), stop=stop)
        finally:
            await pods_client.close()
            await store.close()

    code = run_until_stopped(main)
    if code:
        raise typer.Exit(code)
