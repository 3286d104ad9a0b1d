"""`kubectl fs ...`: the same `fsb` CLI installed as the kubectl plugin `kubectl-fs`.

kubectl runs `kubectl-fs` from PATH for `kubectl fs exec|logs|cp|run|get ...`. As a plugin the
CLI takes its defaults from where a kubectl user already is: the namespace of the current
kubeconfig context, and the Fast-Path of the controller's Service (`fastsandbox-controller` in
`fastsandbox-system`, port `fastpath`; `FSB_CONTROLLER_SERVICE=NAMESPACE/NAME` names another).
Flags and `FSB_*` variables still win: the defaults are
given as `FSB_NAMESPACE` / `FSB_ENDPOINT` only when those are unset, so `-n` and `--endpoint`
override them as everywhere else. A cluster that cannot be asked leaves the usual defaults.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVICE_NAME = "fastsandbox-controller"
SERVICE_NAMESPACE = "fastsandbox-system"
SERVICE_PORT = "fastpath"


def _kubeconfig(env: dict[str, str] | os._Environ[str]) -> Any:
    """The current context of `$KUBECONFIG` (first existing file) or `~/.kube/config`; None."""
    from lightkube.config.kubeconfig import KubeConfig

    candidates = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    candidates.append(str(Path.home() / ".kube" / "config"))
    for candidate in candidates:
        path = Path(candidate).expanduser()
        if path.exists():
            try:
                return KubeConfig.from_file(path).get()
            except Exception as exc:  # a broken kubeconfig must not break `kubectl fs --help`
                log.debug("kubeconfig %s unusable: %s", path, exc)
                return None
    return None


def context_namespace(config: Any) -> str | None:
    namespace = getattr(config, "namespace", None)
    return str(namespace) if namespace else None


def service_endpoint(config: Any, service: str = "") -> str | None:
    """`clusterIP:port` of the controller's Service, asked of the apiserver; None if it cannot."""
    namespace, _, name = (service or f"{SERVICE_NAMESPACE}/{SERVICE_NAME}").rpartition("/")
    try:
        import httpx2
        from lightkube import Client
        from lightkube.resources.core_v1 import Service

        svc = Client(config, timeout=httpx2.Timeout(5.0)).get(
            Service, name, namespace=namespace or SERVICE_NAMESPACE
        )
    except Exception as exc:
        log.debug("no controller Service: %s", exc)
        return None
    spec = svc.spec
    if spec is None or not spec.clusterIP or spec.clusterIP == "None":
        return None
    port = next((p.port for p in spec.ports or [] if p.name == SERVICE_PORT), None)
    if port is None and spec.ports:
        port = spec.ports[0].port
    return f"{spec.clusterIP}:{port}" if port else None


def plugin_defaults(env: dict[str, str] | os._Environ[str], args: Sequence[str]) -> dict[str, str]:
    """The `FSB_*` defaults the plugin adds to `env` (only those that are unset)."""
    wanted_ns = not env.get("FSB_NAMESPACE")
    wanted_ep = not env.get("FSB_ENDPOINT") and "--endpoint" not in args
    if not (wanted_ns or wanted_ep):
        return {}
    config = _kubeconfig(env)
    if config is None:
        return {}
    out: dict[str, str] = {}
    if wanted_ns and (ns := context_namespace(config)):
        out["FSB_NAMESPACE"] = ns
    service = env.get("FSB_CONTROLLER_SERVICE", "")
    if wanted_ep and (endpoint := service_endpoint(config, service)):
        out["FSB_ENDPOINT"] = endpoint
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point of `kubectl-fs`."""
    import sys

    from fastsandbox.cli import main as cli

    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.update(plugin_defaults(os.environ, args))
    cli.app.info.name = "kubectl fs"
    return cli.main(args)


if __name__ == "__main__":
    raise SystemExit(main())
