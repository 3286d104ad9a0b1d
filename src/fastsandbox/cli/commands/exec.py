"""`fsb exec NAME [-i] [-t] [-e K=V]... [-w DIR] [-u USER] [--timeout S] -- CMD...`, like
`docker exec`.

The command's exit code is ours (128+N when a signal killed it). With `-i` our stdin is
streamed to the command (EOF included); Ctrl-C / SIGTERM are forwarded to the command's process
group rather than killing this client. With `-t` the command gets a PTY of our window's size,
our terminal is put in raw mode (restored on every way out) and each SIGWINCH sends the new size.
Without a terminal, `-t` still works (80x24), so scripts and pipes can ask for a TTY.
`--timeout S`: the command is killed after S seconds and we exit 124 ("command timed out"), as
GNU `timeout` does; 124 cannot be confused with the 1-7 of our own errors nor, in practice,
with a command's.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from fastsandbox.cli.exec_run import env_pairs, run_exec
from fastsandbox.cli.options import Endpoint, Namespace, TokenFile


def exec_(
    name: Annotated[str, typer.Argument(help="Sandbox name.", show_default=False)],
    command: Annotated[
        list[str], typer.Argument(help="The command and its arguments.", show_default=False)
    ],
    interactive: Annotated[
        bool, typer.Option("-i", "--interactive", help="Stream stdin to the command.")
    ] = False,
    tty: Annotated[bool, typer.Option("-t", "--tty", help="Give the command a terminal.")] = False,
    env: Annotated[
        list[str] | None,
        typer.Option("-e", "--env", metavar="KEY=VALUE", help="Set a variable (repeatable)."),
    ] = None,
    workdir: Annotated[
        str | None, typer.Option("-w", "--workdir", help="Working directory (absolute).")
    ] = None,
    user: Annotated[
        str | None, typer.Option("-u", "--user", help="User name, uid or uid:gid.")
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", metavar="SECONDS", help="Kill it after this long (exit 124)."),
    ] = None,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Run a command in a running sandbox; exits with the command's exit code."""
    from fastsandbox.errors import InvalidArgument

    if timeout is not None and timeout <= 0:
        raise InvalidArgument("--timeout: must be a positive number of seconds")
    code = asyncio.run(
        run_exec(
            name,
            list(command),
            interactive=interactive,
            tty=tty,
            env=env_pairs(env or []),
            workdir=workdir,
            user=user,
            timeout=timeout,
            endpoint=endpoint,
            token_file=token_file,
            namespace=namespace,
        )
    )
    raise typer.Exit(code)
