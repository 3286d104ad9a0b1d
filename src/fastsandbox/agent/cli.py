"""Command line of the agent daemon: `python -m fastsandbox.agent` and `fsb agent`.

Plain argparse, and grpc/containerd imported only after the flags parsed: agents are started on
pool scale-up, so the process must be serving as soon as possible (and `--help` stays instant).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from fastsandbox.settings import AgentSettings, LogSettings, default_data_dir

log = logging.getLogger(__name__)

# The agent Pod gets its token from a Secret through this variable (fleet/kubernetes.py).
TOKEN_ENV = "FSB_AGENT_TOKEN"


class UsageError(ValueError):
    """Flags that parse but do not fit together; `main` reports it as a usage error (exit 2).
    Not an `FsbError`: that would import grpc before the flags are even checked."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def build_parser(prog: str = "fsb agent") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run a Fast Sandbox agent: host up to --capacity sandboxes on containerd "
        "and serve the agent gRPC API.",
    )
    p.add_argument("--name", help="agent name, unique per containerd (default: the host name)")
    p.add_argument("--pool", default="default-pool", help="pool this agent belongs to")
    p.add_argument("--namespace", default="default", help="namespace of the pool")
    p.add_argument(
        "--listen",
        help="unix:///path/agent.sock (made mode 0600) or HOST:PORT "
        "(default: unix://<state-dir>/agent.sock)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token every API call must carry (default: $FSB_AGENT_TOKEN); "
        "required when --listen is HOST:PORT",
    )
    p.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="serve HOST:PORT without a token: anyone reaching the port can run root containers",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="per-agent directory holding sandbox logs (default: <data-dir>/agents/<name>)",
    )
    p.add_argument(
        "--containerd-socket",
        type=Path,
        default=Path("/run/containerd/containerd.sock"),
        help="containerd's gRPC socket",
    )
    p.add_argument("--containerd-namespace", default="fastsandbox", help="containerd namespace")
    p.add_argument("--capacity", type=_positive_int, default=5, help="max running sandboxes")
    p.add_argument("--runtime", choices=["runc", "gvisor"], default="runc")
    p.add_argument(
        "--agent-ip", default="127.0.0.1", help="address sandboxes' ports are reachable at"
    )
    p.add_argument(
        "--netns-path", help="network namespace sandboxes join (default: the host network)"
    )
    p.add_argument("--cgroup-parent", default="/fastsandbox", help="cgroup parent of sandboxes")
    p.add_argument(
        "--pod-uid",
        help="the uid of the Kubernetes Pod the agent runs in: sandboxes join that Pod's network "
        "namespace and cgroup (overriding --netns-path and --cgroup-parent), and fsb-init is "
        "copied into --state-dir, which must be a hostPath mounted at the same path",
    )
    p.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="registry pulled from over plain HTTP (repeatable)",
    )
    p.add_argument(
        "--grace",
        type=_non_negative_float,
        default=10.0,
        metavar="SECONDS",
        help="SIGTERM to SIGKILL grace on sandbox delete when the request gives none",
    )
    p.add_argument(
        "--version",
        default=None,
        help="version reported in Status, compared with the pool's agentVersion on rolling "
        "updates (default: the installed fastsandbox version)",
    )
    p.add_argument(
        "--init-path",
        help="fsb-init binary run as PID 1 in sandboxes; 'none' disables it "
        "(default: $FSB_INIT_PATH, the checkout's build, /usr/local/libexec/fastsandbox/fsb-init)",
    )
    p.add_argument(
        "--logger-path",
        help="fsb-logger binary, containerd's binary:// log driver (stdout/stderr apart, "
        "capped); 'none' uses file:// (default: $FSB_LOGGER_PATH, the checkout's build, "
        "/usr/local/libexec/fastsandbox/fsb-logger)",
    )
    p.add_argument(
        "--log-max-bytes",
        type=_log_cap,
        default=10 * 1024 * 1024,
        metavar="BYTES",
        help="cap of a sandbox's captured output when its spec gives none (newest kept)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.add_argument("--log-format", choices=["json", "console", "auto"], default="auto")
    p.add_argument("--log-file", type=Path, help="also write JSON logs here, size-rotated")
    return p


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastsandbox")
    except PackageNotFoundError:
        return "0+unknown"


def _init_path(given: str | None) -> Path | None:
    from fastsandbox.agent.init_binary import find_init

    if given == "none":
        return None
    if given:
        return Path(given)
    found = find_init()
    if found is None:
        log.warning(
            "fsb-init not found (run scripts/setup); sandbox commands run as PID 1 and "
            "deletes wait the whole grace period unless they handle SIGTERM"
        )
    return found


def _logger_path(given: str | None) -> Path | None:
    from fastsandbox.agent.logger_binary import find_logger

    if given == "none":
        return None
    if given:
        return Path(given)
    found = find_logger()
    if found is None:
        log.warning(
            "fsb-logger not found (run scripts/setup); sandbox logs mix stdout and stderr "
            "in one file with no cap"
        )
    return found


def _log_cap(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    if value < 64 * 1024:
        raise argparse.ArgumentTypeError(f"{value} is less than 65536 (64 KiB)")
    return value


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """`--token-file`, else $FSB_AGENT_TOKEN; None when neither is given."""
    if args.token_file is not None:
        try:
            token: str = args.token_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--token-file: cannot read {args.token_file}: {exc}") from None
        if not token:
            raise UsageError(f"--token-file: {args.token_file} is empty")
        return token
    return environ.get(TOKEN_ENV, "").strip() or None


def _listen_address(listen: str) -> str:
    """`HOST:PORT` with an IPv6 host bracketed: a Pod's `$(POD_IP):7443` may be `fd00::5:7443`."""
    if listen.startswith("unix:") or listen.startswith("["):
        return listen
    host, sep, port = listen.rpartition(":")
    return f"[{host}]:{port}" if sep and ":" in host else listen


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> AgentSettings:
    """Raises `UsageError` for a HOST:PORT listen address without a token (and without
    `--insecure-no-token`), or an unreadable token file."""
    name: str = args.name or socket.gethostname()
    state_dir: Path = args.state_dir or default_data_dir() / "agents" / name
    listen = _listen_address(args.listen or f"unix://{state_dir / 'agent.sock'}")
    token = _token(args, os.environ if environ is None else environ)
    if token is None and not listen.startswith("unix:") and not args.insecure_no_token:
        raise UsageError(
            f"--listen {listen} is a network address: give a token with --token-file or "
            f"${TOKEN_ENV} (or pass --insecure-no-token on a network nobody else can reach)"
        )
    return AgentSettings(
        name=name,
        pool=args.pool,
        namespace=args.namespace,
        listen=listen,
        state_dir=state_dir,
        containerd_socket=args.containerd_socket,
        containerd_namespace=args.containerd_namespace,
        capacity=args.capacity,
        runtime=args.runtime,
        agent_ip=args.agent_ip,
        netns_path=args.netns_path,
        cgroup_parent=args.cgroup_parent,
        insecure_registries=list(args.insecure_registry),
        delete_grace_seconds=args.grace,
        init_path=_init_path(args.init_path),
        logger_path=_logger_path(args.logger_path),
        log_max_bytes=args.log_max_bytes,
        version=args.version if args.version is not None else _package_version(),
        token=token,
        insecure_no_token=args.insecure_no_token,
        pod_uid=args.pod_uid or None,
        log=LogSettings(level=args.log_level, format=args.log_format, file=args.log_file),
    )


async def _run(settings: AgentSettings) -> None:
    import asyncio

    from fastsandbox.agent.server import run

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(settings, ready=None, stop=stop)


def main(argv: list[str] | None = None) -> int:
    """Entry of `python -m fastsandbox.agent` and `fsb agent`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except UsageError as exc:
        parser.error(str(exc))  # exits 2, like any other bad flag
    from fastsandbox.logconfig import configure

    configure(settings.log, component="agent")
    import asyncio

    from fastsandbox.errors import FsbError

    try:
        asyncio.run(_run(settings))
    except FsbError as exc:
        log.error("agent failed: %s", exc.message, extra={"agent": settings.name})
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
