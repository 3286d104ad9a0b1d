"""Options every verb shares, declared once, and the one way commands get a `Client`.

Only `typer` is imported at module level: `fsb` is called thousands of times by scripts, so grpc,
pydantic and rich are imported by the commands that need them, when they run.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

from fastsandbox.settings import DEFAULT_ENDPOINT

if TYPE_CHECKING:
    from pathlib import Path

    from fastsandbox.sdk.sync import Client
    from fastsandbox.settings import LogSettings

CLIENT_PANEL = "Client options"


class Output(StrEnum):
    """`table` is the human view; `json` and `yaml` print the API object for scripts."""

    table = "table"
    json = "json"
    yaml = "yaml"


SandboxName = Annotated[str, typer.Argument(help="Sandbox name.", show_default=False)]
Endpoint = Annotated[
    str | None,
    typer.Option(
        "--endpoint",
        envvar="FSB_ENDPOINT",
        metavar="HOST:PORT",
        help=f"Fast-Path address of fsb server (default: config file, else {DEFAULT_ENDPOINT}).",
        rich_help_panel=CLIENT_PANEL,
        show_default=False,
    ),
]
TokenFile = Annotated[
    str | None,
    typer.Option(
        "--token-file",
        envvar="FSB_TOKEN_FILE",
        metavar="PATH",
        help="File holding the API token (default: $FSB_TOKEN, config file, else the server's "
        "<data-dir>/token). Never pass a token itself on the command line.",
        rich_help_panel=CLIENT_PANEL,
        show_default=False,
    ),
]
Namespace = Annotated[
    str | None,
    typer.Option(
        "-n",
        "--namespace",
        envvar="FSB_NAMESPACE",
        help="Namespace (default: config file, else `default`).",
        rich_help_panel=CLIENT_PANEL,
        show_default=False,
    ),
]
OutputOpt = Annotated[
    Output,
    typer.Option("-o", "--output", help="Output format: json/yaml print the API object."),
]
AllNamespaces = Annotated[
    bool, typer.Option("-A", "--all-namespaces", help="List across every namespace.")
]


def client(endpoint: str | None, token_file: str | None, namespace: str | None) -> Client:
    """A `Client` from the shared options (flags > `FSB_*` env > config file > the local
    server's data dir > defaults)."""
    from fastsandbox.sdk.sync import Client

    return Client(endpoint, None, namespace, token_file=token_file)


TOKEN_ON_ARGV = (
    "--token: a token on the command line is visible to every user of this machine (ps, "
    "/proc/*/cmdline, shell history); put it in a file and pass --token-file PATH, or set "
    "FSB_TOKEN"
)


def refuse_token_on_argv(argv: list[str]) -> None:
    """`--token VALUE` anywhere before a `--` (after it the words are a sandbox's command):
    InvalidArgument pointing to --token-file. Checked before parsing, for every verb."""
    from fastsandbox.errors import InvalidArgument

    for word in argv:
        if word == "--":
            return
        if word == "--token" or word.startswith("--token="):
            raise InvalidArgument(TOKEN_ON_ARGV)


# Logging of the long-running commands (server, controller, janitor).
LogLevel = Annotated[
    str, typer.Option("--log-level", envvar="FSB_LOG_LEVEL", metavar="debug|info|warning|error")
]
LogFormat = Annotated[
    str, typer.Option("--log-format", envvar="FSB_LOG_FORMAT", metavar="auto|json|console")
]
LogFile = Annotated[
    "Path | None",
    typer.Option(
        "--log-file",
        envvar="FSB_LOG_FILE",
        metavar="PATH",
        help="Also write JSON logs here, size-rotated.",
    ),
]


def log_settings(level: str, format_: str, file: Path | None = None) -> LogSettings:
    """The validated log options, or InvalidArgument naming the flag."""
    from fastsandbox.errors import InvalidArgument
    from fastsandbox.settings import LogSettings

    if level.lower() not in ("debug", "info", "warning", "error"):
        raise InvalidArgument(f"--log-level: must be debug, info, warning or error, not {level!r}")
    if format_ not in ("auto", "json", "console"):
        raise InvalidArgument(f"--log-format: must be auto, json or console, not {format_!r}")
    return LogSettings(level=level.lower(), format=format_, file=file)


MetricsListen = Annotated[
    str | None,
    typer.Option(
        "--metrics-listen",
        envvar="FSB_METRICS_LISTEN",
        metavar="HOST:PORT",
        help="Serve /metrics (Prometheus), /healthz and /readyz on this address (off by default).",
    ),
]


# The janitor's, shared by `fsb server` (its janitor runs in-process) and `fsb janitor`.
OrphanTimeout = Annotated[
    float,
    typer.Option(
        "--orphan-timeout",
        envvar="FSB_ORPHAN_TIMEOUT",
        metavar="SECONDS",
        help="Remove a container left without a record (or agent) this long.",
    ),
]


def check_orphan_timeout(seconds: float) -> None:
    from fastsandbox.errors import InvalidArgument

    if seconds < 0:
        raise InvalidArgument(f"--orphan-timeout: must be >= 0 seconds, not {seconds}")


# The Fast-Path's serving options, shared by `fsb server` and `fsb controller`.
Listen = Annotated[
    str,
    typer.Option("--listen", envvar="FSB_LISTEN", metavar="HOST:PORT", help="Fast-Path address."),
]
AllowedRegistries = Annotated[
    list[str] | None,
    typer.Option(
        "--allowed-registry",
        metavar="HOST[:PORT]",
        help="Agents pull only from these (repeatable; default: docker.io + insecure ones).",
    ),
]
InsecureRegistries = Annotated[
    list[str] | None,
    typer.Option(
        "--insecure-registry",
        metavar="HOST:PORT",
        help="Agents pull from this one over plain HTTP (repeatable).",
    ),
]
ServeTokenFile = Annotated[
    "Path | None",
    typer.Option(
        "--token-file",
        envvar="FSB_TOKEN_FILE",
        metavar="PATH",
        help="Require the admin token in this file (also: $FSB_TOKEN).",
        show_default=False,
    ),
]
TlsCert = Annotated[
    "Path | None",
    typer.Option(
        "--tls-cert",
        envvar="FSB_TLS_CERT",
        metavar="PATH",
        help="Serve TLS with this certificate chain (PEM; with --tls-key).",
        show_default=False,
    ),
]
TlsKey = Annotated[
    "Path | None",
    typer.Option(
        "--tls-key",
        envvar="FSB_TLS_KEY",
        metavar="PATH",
        help="The private key of --tls-cert (PEM).",
        show_default=False,
    ),
]
Insecure = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Serve plaintext gRPC (only on a loopback --listen address).",
    ),
]


def serve_security(
    token_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    insecure: bool,
    listen: str,
    environ: dict[str, str] | None = None,
) -> tuple[str | None, Path | None, Path | None]:
    """The admin token (from --token-file or $FSB_TOKEN; None: the server's default) and the
    certificate paths, checked together; InvalidArgument naming the flag."""
    import os

    from fastsandbox.errors import InvalidArgument

    env = dict(os.environ) if environ is None else environ
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("--tls-cert and --tls-key: give both or neither")
    if insecure and tls_cert is not None:
        raise InvalidArgument("--insecure: cannot serve plaintext with --tls-cert")
    if insecure:
        from fastsandbox._addr import is_loopback

        if not is_loopback(listen):
            raise InvalidArgument(
                f"--insecure: plaintext is allowed only on a loopback address, not {listen}; "
                "drop --insecure (TLS) or listen on 127.0.0.1"
            )
    token: str | None = None
    if token_file is not None:
        try:
            token = token_file.expanduser().read_text().strip()
        except OSError as exc:
            reason = exc.strerror
            raise InvalidArgument(f"--token-file: cannot read {token_file} ({reason})") from None
        if not token:
            raise InvalidArgument(f"--token-file: {token_file} is empty")
    elif env.get("FSB_TOKEN"):
        token = env["FSB_TOKEN"].strip()
    return (
        token,
        tls_cert.expanduser().absolute() if tls_cert else None,
        tls_key.expanduser().absolute() if tls_key else None,
    )
