"""The `fsb` (alias `fsb-ctl`) command line: every verb on the one error seam (`cli/app.py`).

Each verb lives in `cli/commands/<verb>.py`. Errors become exit codes in `cli/app.py`'s
`_Group.invoke` and nowhere else; the codes come from the one table in `errors.py`. Scripts call
`fsb` thousands of times, so nothing heavier than typer is imported before a verb runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

from fastsandbox.cli import app as seam
from fastsandbox.cli.commands import agent, apply, delete, get, logs, pool, run, server
from fastsandbox.cli.commands import controller as controller_cmd
from fastsandbox.cli.commands import cp as cp_cmd
from fastsandbox.cli.commands import crds as crds_cmd
from fastsandbox.cli.commands import describe as describe_cmd
from fastsandbox.cli.commands import exec as exec_cmd
from fastsandbox.cli.commands import janitor as janitor_cmd
from fastsandbox.cli.commands import list as list_cmd
from fastsandbox.cli.commands import reset as reset_cmd
from fastsandbox.cli.commands import token as token_cmd
from fastsandbox.cli.commands import update as update_cmd


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
    app = seam.typer_app()
    app.callback()(_root)
    app.command("run", no_args_is_help=True)(run.run)
    app.command("get", no_args_is_help=True)(get.get)
    app.command("describe", no_args_is_help=True)(describe_cmd.describe)
    app.command("list")(list_cmd.list_)
    app.command("logs", no_args_is_help=True)(logs.logs)
    app.command("exec", no_args_is_help=True)(exec_cmd.exec_)
    app.command("cp", no_args_is_help=True)(cp_cmd.cp)
    app.command("delete", no_args_is_help=True)(delete.delete)
    app.command("update", no_args_is_help=True)(update_cmd.update)
    app.command("reset", no_args_is_help=True)(reset_cmd.reset)
    app.command("apply", no_args_is_help=True)(apply.apply)
    app.add_typer(pool.app, name="pool")
    app.add_typer(token_cmd.app, name="token")
    app.command("server")(server.server)
    app.command("controller")(controller_cmd.controller)
    app.command("agent")(agent.agent)
    app.command("crds")(crds_cmd.crds)
    app.command("janitor", no_args_is_help=True)(janitor_cmd.janitor)
    return app


app = build_app()


def main(argv: Sequence[str] | None = None, prog_name: str | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    return seam.run(app, argv, prog_name)


if __name__ == "__main__":
    sys.exit(main())
