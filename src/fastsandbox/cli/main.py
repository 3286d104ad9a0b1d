"""The `fsb` (alias `fsb-ctl`) command line: builds the Typer app and maps errors to exit codes.

Each verb lives in `cli/commands/<verb>.py`. Every `FsbError` becomes one line on stderr and its
`exit_code` here, in `_Group.invoke`, and nowhere else; click's own usage errors exit 2. Scripts
call `fsb` thousands of times, so nothing heavier than typer is imported before a verb runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from fastsandbox.cli.commands import agent, apply, delete, get, logs, pool, run, server
from fastsandbox.cli.commands import controller as controller_cmd
from fastsandbox.cli.commands import crds as crds_cmd
from fastsandbox.cli.commands import describe as describe_cmd
from fastsandbox.cli.commands import janitor as janitor_cmd
from fastsandbox.cli.commands import list as list_cmd
from fastsandbox.cli.commands import reset as reset_cmd
from fastsandbox.cli.commands import update as update_cmd


def _is_usage_error(exc: BaseException) -> bool:
    # Matched by name: typer vendors its own click (typer._click), older typers use click.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "UsageError" in names and "NoArgsIsHelpError" not in names


def _report(exc: BaseException) -> int | None:
    """Print `exc` as one line and return its exit code; None when it is not ours to report."""
    from fastsandbox.cli.render import error
    from fastsandbox.errors import FsbError

    if isinstance(exc, FsbError):
        error(exc.message)
        return exc.exit_code
    if _is_usage_error(exc):
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        error(exc.format_message() + hint)  # type: ignore[attr-defined]
        return 2
    return None


class _Group(TyperGroup):
    """The top-level group: the one place errors from any verb become exit codes."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            code = _report(exc)
            if code is None:
                raise
            raise typer.Exit(code) from None


def _version(value: bool) -> None:
    if value:
        from fastsandbox import __version__

        typer.echo(f"fsb {__version__}")
        raise typer.Exit()


def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Fast Sandbox: isolated containers running in milliseconds."""


def build_app() -> typer.Typer:
    app = typer.Typer(
        cls=_Group,
        name="fsb",
        help="Fast Sandbox: isolated containers running in milliseconds.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    app.command("run", no_args_is_help=True)(run.run)
    app.command("get", no_args_is_help=True)(get.get)
    app.command("describe", no_args_is_help=True)(describe_cmd.describe)
    app.command("list")(list_cmd.list_)
    app.command("logs", no_args_is_help=True)(logs.logs)
    app.command("delete", no_args_is_help=True)(delete.delete)
    app.command("update", no_args_is_help=True)(update_cmd.update)
    app.command("reset", no_args_is_help=True)(reset_cmd.reset)
    app.command("apply", no_args_is_help=True)(apply.apply)
    app.add_typer(pool.app, name="pool")
    app.command("server")(server.server)
    app.command("controller")(controller_cmd.controller)
    app.command("agent", context_settings=agent.CONTEXT, add_help_option=False)(agent.agent)
    app.command("crds")(crds_cmd.crds)
    app.command("janitor", no_args_is_help=True)(janitor_cmd.janitor)
    return app


app = build_app()


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    try:
        app(args=list(argv) if argv is not None else None)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as exc:
        # A bug, not a user error: still one line, with the traceback on request.
        if os.environ.get("FSB_DEBUG"):
            raise
        from fastsandbox.cli.render import error

        error(f"unexpected {type(exc).__name__}: {exc} (set FSB_DEBUG=1 for the traceback)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
