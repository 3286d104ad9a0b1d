"""The agent daemon's start-up: `AgentArgs` (what `fsb agent` parsed) → `AgentSettings` → run.

The flags themselves are the `fsb agent` verb (`cli/commands/agent.py`), built by the fleets
through `AgentArgs.argv()` (agent/args.py); `python -m fastsandbox.agent` runs that same verb.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastsandbox.agent.args import TOKEN_ENV, AgentArgs
from fastsandbox.settings import AgentSettings, LogSettings, default_data_dir

log = logging.getLogger(__name__)


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
            "fsb-supervisor not found (run scripts/setup); sandbox commands run as PID 1 and "
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


def _token(args: AgentArgs, environ: Mapping[str, str]) -> str | None:
    """`--token-file`, else $FSB_AGENT_TOKEN; None when neither is given."""
    from fastsandbox.errors import InvalidArgument

    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise InvalidArgument(f"--token-file: cannot read {args.token_file}: {exc}") from None
        if not token:
            raise InvalidArgument(f"--token-file: {args.token_file} is empty")
        return token
    return environ.get(TOKEN_ENV, "").strip() or None


def _listen_address(listen: str) -> str:
    """`HOST:PORT` with an IPv6 host bracketed: a Pod's `$(POD_IP):7443` may be `fd00::5:7443`."""
    if listen.startswith("unix:") or listen.startswith("["):
        return listen
    host, sep, port = listen.rpartition(":")
    return f"[{host}]:{port}" if sep and ":" in host else listen


def settings_from_args(args: AgentArgs, environ: Mapping[str, str] | None = None) -> AgentSettings:
    """Raises `InvalidArgument` (exit 2) for a HOST:PORT listen address without a token (and
    without `--insecure-no-token`), or an unreadable token file."""
    from fastsandbox.errors import InvalidArgument

    name = args.name or socket.gethostname()
    state_dir = args.state_dir or default_data_dir() / "agents" / name
    listen = _listen_address(args.listen or f"unix://{state_dir / 'agent.sock'}")
    token = _token(args, os.environ if environ is None else environ)
    if token is None and not listen.startswith("unix:") and not args.insecure_no_token:
        raise InvalidArgument(
            f"--listen {listen} is a network address: give a token with --token-file or "
            f"${TOKEN_ENV} (or pass --insecure-no-token on a network nobody else can reach)"
        )
    if (args.tls_cert is None) != (args.tls_key is None):
        raise InvalidArgument("--tls-cert and --tls-key go together: give both or neither")
    if args.tls_cert is not None and listen.startswith("unix:"):
        raise InvalidArgument("--tls-cert: TLS is for a HOST:PORT --listen, not a unix socket")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not path.is_file():
            raise InvalidArgument(f"{flag}: {path} is not a readable file")
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
        network_mode=_choice("--network-mode", args.network_mode, ("private", "shared")),
        egress=_choice("--egress", args.egress, ("none", "allow")),
        egress_allow=list(args.egress_allow),
        forbid=list(args.forbid),
        sandbox_subnet=args.sandbox_subnet,
        port_range=_port_range(args.port_range),
        cgroup_parent=args.cgroup_parent,
        insecure_registries=list(args.insecure_registry),
        delete_grace_seconds=args.grace,
        init_path=_init_path(args.init_path),
        logger_path=_logger_path(args.logger_path),
        log_max_bytes=args.log_max_bytes,
        metrics_listen=args.metrics_listen,
        warm_slots=args.warm_slots,
        warm_images=tuple(args.warm_image),
        warm_recent=args.warm_recent,
        warm_limits=(
            args.warm_cpu_millis or 0,
            args.warm_memory_bytes or 0,
            args.warm_pids_limit or 0,
        ),
        version=args.version if args.version is not None else _package_version(),
        token=token,
        insecure_no_token=args.insecure_no_token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        pod_uid=args.pod_uid or None,
        log=LogSettings(level=args.log_level, format=args.log_format, file=args.log_file),
    )


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> str:
    from fastsandbox.errors import InvalidArgument

    if value not in allowed:
        raise InvalidArgument(f"{flag} {value!r}: must be {' or '.join(allowed)}")
    return value


def _port_range(text: str) -> tuple[int, int]:
    from fastsandbox.errors import InvalidArgument

    first, _, last = text.partition("-")
    if not (first.isdigit() and last.isdigit() and 1 <= int(first) <= int(last) <= 65535):
        raise InvalidArgument(f"--port-range {text!r}: must be FIRST-LAST within 1-65535")
    return int(first), int(last)


async def _serve(settings: AgentSettings) -> None:
    import asyncio

    from fastsandbox.agent.server import run as serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, ready=None, stop=stop)


def run(args: AgentArgs) -> None:
    """Serve until SIGTERM/SIGINT. An `FsbError` is logged (the agent's log is JSON for the
    fleets to read) and raised on, for `fsb`'s one error-to-exit-code seam (cli/main.py)."""
    from fastsandbox._aio import loop
    from fastsandbox.errors import FsbError
    from fastsandbox.logconfig import configure

    settings = settings_from_args(args)
    configure(settings.log, component="agent")
    try:
        loop.run(_serve(settings))
    except FsbError as exc:
        log.error("agent failed: %s", exc.message, extra={"agent": settings.name})
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fastsandbox.agent ARGS` is `fsb agent ARGS`; returns the exit code."""
    import sys

    from fastsandbox.cli.app import run as run_cli
    from fastsandbox.cli.app import single_verb_app
    from fastsandbox.cli.commands.agent import agent

    args = ["agent", *(sys.argv[1:] if argv is None else argv)]
    return run_cli(single_verb_app("agent", agent), args, prog_name="fsb")
