"""`fsb agent`: run one agent daemon (also `python -m fastsandbox.agent`).

Agents are started by `fsb server`'s local fleet and by the Kubernetes fleet's Pods, not typed by
people, but they are a verb like any other: the same framework, errors and exit codes. Each
option is named after its `AgentArgs` field (agent/args.py), which the fleets use to build this
command line; `parse` reads one back without running it (tests check the round trip). grpc and
containerd are imported only after the flags parsed: agents start on pool scale-up, so `--help`
and bad flags stay instant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from fastsandbox.agent.args import DEFAULTS, AgentArgs
from fastsandbox.api.models import MIN_LOG_MAX_BYTES


class Runtime(StrEnum):
    runc = "runc"
    gvisor = "gvisor"


class Level(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class Format(StrEnum):
    json = "json"
    console = "console"
    auto = "auto"


_RUNTIME, _LEVEL, _FORMAT = (
    Runtime(DEFAULTS.runtime),
    Level(DEFAULTS.log_level),
    Format(DEFAULTS.log_format),
)


def agent(
    *,
    name: Annotated[
        str | None, typer.Option(help="Agent name, unique per containerd (default: the host name).")
    ] = DEFAULTS.name,
    pool: Annotated[str, typer.Option(help="Pool this agent belongs to.")] = DEFAULTS.pool,
    namespace: Annotated[str, typer.Option(help="Namespace of the pool.")] = DEFAULTS.namespace,
    listen: Annotated[
        str | None,
        typer.Option(
            metavar="unix:///PATH|HOST:PORT",
            help="unix:///path/agent.sock (made mode 0600) or HOST:PORT "
            "(default: unix://<state-dir>/agent.sock).",
        ),
    ] = DEFAULTS.listen,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the bearer token every API call must carry "
            "(default: $FSB_AGENT_TOKEN); required when --listen is HOST:PORT."
        ),
    ] = DEFAULTS.token_file,
    insecure_no_token: Annotated[
        bool,
        typer.Option(
            "--insecure-no-token",
            help="Serve HOST:PORT without a token: anyone reaching the port can run root "
            "containers.",
        ),
    ] = DEFAULTS.insecure_no_token,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            help="PEM certificate to serve HOST:PORT with TLS (with --tls-key); the Kubernetes "
            "fleet gives each agent one signed by the controller's agent CA."
        ),
    ] = DEFAULTS.tls_cert,
    tls_key: Annotated[
        Path | None, typer.Option(help="PEM private key of --tls-cert.")
    ] = DEFAULTS.tls_key,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Per-agent directory holding sandbox logs (default: <data-dir>/agents/<name>)."
        ),
    ] = DEFAULTS.state_dir,
    containerd_socket: Annotated[
        Path, typer.Option(help="containerd's gRPC socket.")
    ] = DEFAULTS.containerd_socket,
    containerd_namespace: Annotated[
        str, typer.Option(help="containerd namespace.")
    ] = DEFAULTS.containerd_namespace,
    capacity: Annotated[
        int, typer.Option(min=1, help="Max running sandboxes.")
    ] = DEFAULTS.capacity,
    runtime: Annotated[Runtime, typer.Option(help="OCI runtime.")] = _RUNTIME,
    agent_ip: Annotated[
        str, typer.Option(help="Address sandboxes' ports are reachable at.")
    ] = DEFAULTS.agent_ip,
    netns_path: Annotated[
        str | None,
        typer.Option(help="Network namespace sandboxes join (default: the host network)."),
    ] = DEFAULTS.netns_path,
    network_mode: Annotated[
        str,
        typer.Option(
            metavar="private|shared",
            help="private: a network namespace per sandbox wired into --netns-path; shared: "
            "sandboxes join --netns-path.",
        ),
    ] = DEFAULTS.network_mode,
    egress: Annotated[
        str, typer.Option(metavar="none|allow", help="Private sandboxes' outbound traffic.")
    ] = DEFAULTS.egress,
    egress_allow: Annotated[
        list[str] | None,
        typer.Option(metavar="CIDR", help="With --egress allow: only to this CIDR (repeatable)."),
    ] = None,
    forbid: Annotated[
        list[str] | None,
        typer.Option(
            metavar="CIDR",
            help="Never reachable from a private sandbox (repeatable; loopback, link-local "
            "and multicast always are).",
        ),
    ] = None,
    sandbox_subnet: Annotated[
        str, typer.Option(metavar="CIDR", help="Private sandboxes' addresses (a /31 each).")
    ] = DEFAULTS.sandbox_subnet,
    port_range: Annotated[
        str,
        typer.Option(metavar="FIRST-LAST", help="Host ports private sandboxes publish on."),
    ] = DEFAULTS.port_range,
    cgroup_parent: Annotated[
        str, typer.Option(help="cgroup parent of sandboxes.")
    ] = DEFAULTS.cgroup_parent,
    pod_uid: Annotated[
        str | None,
        typer.Option(
            help="The uid of the Kubernetes Pod the agent runs in: sandboxes join that Pod's "
            "network namespace and cgroup (overriding --netns-path and --cgroup-parent), and "
            "fsb-supervisor is copied into --state-dir, which must be a hostPath mounted at the "
            "same path."
        ),
    ] = DEFAULTS.pod_uid,
    insecure_registry: Annotated[
        list[str] | None,
        typer.Option(
            metavar="HOST:PORT", help="Registry pulled from over plain HTTP (repeatable)."
        ),
    ] = None,
    grace: Annotated[
        float,
        typer.Option(
            min=0,
            metavar="SECONDS",
            help="SIGTERM to SIGKILL grace on sandbox delete when the request gives none.",
        ),
    ] = DEFAULTS.grace,
    version: Annotated[
        str | None,
        typer.Option(
            help="Version reported in Status, compared with the pool's agentVersion on rolling "
            "updates (default: the installed fastsandbox version)."
        ),
    ] = DEFAULTS.version,
    init_path: Annotated[
        str | None,
        typer.Option(
            help="fsb-supervisor binary run as PID 1 in sandboxes; 'none' disables it (default: "
            "$FSB_SUPERVISOR_PATH, the checkout's build, "
            "/usr/local/libexec/fastsandbox/fsb-supervisor)."
        ),
    ] = DEFAULTS.init_path,
    logger_path: Annotated[
        str | None,
        typer.Option(
            help="fsb-logger binary, containerd's binary:// log driver (stdout/stderr apart, "
            "capped); 'none' uses file:// (default: $FSB_LOGGER_PATH, the checkout's build, "
            "/usr/local/libexec/fastsandbox/fsb-logger)."
        ),
    ] = DEFAULTS.logger_path,
    log_max_bytes: Annotated[
        int,
        typer.Option(
            min=MIN_LOG_MAX_BYTES,
            metavar="BYTES",
            help="Cap of a sandbox's captured output when its spec gives none (newest kept).",
        ),
    ] = DEFAULTS.log_max_bytes,
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT",
            help="Serve /metrics (Prometheus), /healthz and /readyz here (off by default).",
        ),
    ] = DEFAULTS.metrics_listen,
    warm_slots: Annotated[
        int,
        typer.Option(
            min=0,
            help="Warm slots per hot image: containers made ahead, claimed by creates in a few "
            "milliseconds (runc with fsb-supervisor only; 0 = none).",
        ),
    ] = DEFAULTS.warm_slots,
    warm_image: Annotated[
        list[str] | None,
        typer.Option(metavar="IMAGE", help="An image always kept warm (repeatable)."),
    ] = None,
    warm_recent: Annotated[
        int,
        typer.Option(min=0, help="How many of the most recently served images are kept warm."),
    ] = DEFAULTS.warm_recent,
    warm_cpu_millis: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="The pool's default cpu limit (millicores; 0 = none): where a running "
            "sandbox's limits cannot change (gVisor), pinned images' slots are made with it.",
        ),
    ] = DEFAULTS.warm_cpu_millis,
    warm_memory_bytes: Annotated[
        int | None,
        typer.Option(min=0, help="The pool's default memory limit, as --warm-cpu-millis."),
    ] = DEFAULTS.warm_memory_bytes,
    warm_pids_limit: Annotated[
        int | None, typer.Option(min=0, help="The pool's default pids limit, as --warm-cpu-millis.")
    ] = DEFAULTS.warm_pids_limit,
    log_level: Annotated[Level, typer.Option(help="Log level.")] = _LEVEL,
    log_format: Annotated[Format, typer.Option(help="Log format.")] = _FORMAT,
    log_file: Annotated[
        Path | None, typer.Option(help="Also write JSON logs here, size-rotated.")
    ] = DEFAULTS.log_file,
) -> None:
    """Run one agent: host up to --capacity sandboxes on containerd, serve the agent API."""
    args = _args(locals())  # first: locals() is exactly the options here
    from fastsandbox.agent.cli import run

    run(args)


def _args(params: Mapping[str, Any]) -> AgentArgs:
    """The parsed options as `AgentArgs` (option names are its field names)."""
    values: dict[str, Any] = {
        k: v.value if isinstance(v, StrEnum) else v for k, v in params.items()
    }
    for key in ("insecure_registry", "warm_image", "egress_allow", "forbid"):
        values[key] = tuple(values.get(key) or ())
    return AgentArgs(**values)


def parse(argv: Sequence[str]) -> AgentArgs:
    """What `fsb agent ARGV` would run with, without running it (raises click's usage error)."""
    app = typer.Typer(add_completion=False)
    app.command()(agent)
    command = typer.main.get_command(app)
    with command.make_context("fsb agent", list(argv)) as ctx:
        return _args(dict(ctx.params))
