"""Where the Kubernetes shape finds its apiserver and credentials.

Order: an explicit kubeconfig file (`--kubeconfig`), else `$KUBECONFIG`, else the Pod's service
account (in-cluster). `~/.kube/config` is deliberately not a silent fallback: a controller that
quietly picks up a developer's personal context would act on the wrong cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx2
from lightkube import AsyncClient, ConfigError, KubeConfig
from lightkube.config.client_adapter import AsyncClient as _raw_async_client
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import SingleConfig

from fastsandbox.errors import InvalidArgument

FIELD_MANAGER = "fastsandbox"
# Connect/read/write limit for ordinary requests; a slow apiserver surfaces as `Unavailable`
# instead of hanging a reconciler. Watches lift the read limit.
REQUEST_TIMEOUT = 10.0


def load_config(kubeconfig: Path | None = None) -> SingleConfig:
    """The selected context of `kubeconfig`, `$KUBECONFIG`, or the in-cluster service account."""
    try:
        if kubeconfig is not None:
            return _current(KubeConfig.from_file(kubeconfig), str(kubeconfig))
        env = os.environ.get("KUBECONFIG")
        if env:
            # kubectl merges a list of files; the first one that exists is what people mean.
            for candidate in env.split(os.pathsep):
                if candidate and Path(candidate).expanduser().exists():
                    path = Path(candidate).expanduser()
                    return _current(KubeConfig.from_file(path), str(path))
            raise InvalidArgument(f"KUBECONFIG={env} names no existing file")
        return _current(KubeConfig.from_service_account(), "the in-cluster service account")
    except (ConfigError, OSError) as exc:
        raise InvalidArgument(
            f"no usable Kubernetes configuration ({exc}): pass --kubeconfig, set KUBECONFIG, "
            "or run in a Pod with a service account"
        ) from exc


def _current(config: KubeConfig, where: str) -> SingleConfig:
    single = config.get()
    if single is None:
        raise InvalidArgument(f"{where} has no current context: set one with kubectl config")
    return single


async def make_client(kubeconfig: Path | None = None, namespace: str | None = None) -> AsyncClient:
    """A lightkube client for the configured cluster; `namespace` is its default namespace."""
    return AsyncClient(
        load_config(kubeconfig),
        namespace=namespace,
        field_manager=FIELD_MANAGER,
        timeout=httpx2.Timeout(REQUEST_TIMEOUT),
    )


def raw_http(client: AsyncClient) -> httpx2.AsyncClient:
    """A plain httpx2 client on `client`'s cluster and credentials (base URL, TLS, auth).

    For the few calls lightkube's typed API does not cover: a DELETE whose answer body matters
    (the object still held by finalizers, or a Status saying it is gone) and a watch with
    `allowWatchBookmarks`. The caller closes it.
    """
    return _raw_async_client(
        client.config, ConnectionParams(timeout=httpx2.Timeout(REQUEST_TIMEOUT))
    )
