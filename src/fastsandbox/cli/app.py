"""The one seam where `fsb` turns errors into exit codes, shared by every entry point.

Every `FsbError` becomes one line on stderr and its exit code here, in `_Group.invoke`, and
nowhere else; the codes themselves come from the one table in `errors.py` (click's own usage
errors exit as `InvalidArgument` does, 2). `cli/main.py` builds the whole `fsb` app on it;
`python -m fastsandbox.agent` builds one with the agent verb only (`agent/cli.py`), which is why
this module imports no verb: the agent must not import the control plane's composition root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup


def _is_usage_error(exc: BaseException) -> bool:
    # Matched by name: typer vendors its own click (typer._click), older typers use click.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "UsageError" in names and "NoArgsIsHelpError" not in names


def _report(exc: BaseException) -> int | None:
    """Print `exc` as one line and return its exit code; None when it is not ours to report."""
    from fastsandbox.cli.render import error
    from fastsandbox.errors import FsbError, InvalidArgument, exit_code_of

    if isinstance(exc, FsbError):
        error(exc.message)
        return exit_code_of(exc)
    if _is_usage_error(exc):
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        error(exc.format_message() + hint)  # type: ignore[attr-defined]
        return InvalidArgument.exit_code
    return None


class _Group(TyperGroup):
    """The top-level group: the one place errors from any verb become exit codes."""

    def main(self, args: Sequence[str] | None = None, *a: Any, **kw: Any) -> Any:
        import sys

        from fastsandbox.cli.options import refuse_token_on_argv

        words = list(args) if args is not None else sys.argv[1:]
        try:
            # Before parsing: `--token VALUE` is refused with where the token goes instead.
            refuse_token_on_argv(words)
        except Exception as exc:
            code = _report(exc)
            if code is None:
                raise
            sys.exit(code)
        return super().main(words, *a, **kw)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            code = _report(exc)
            if code is None:
                raise
            raise typer.Exit(code) from None


def typer_app() -> typer.Typer:
    """An empty `fsb` app on `_Group`; the caller adds the verbs."""
    return typer.Typer(
        cls=_Group,
        name="fsb",
        help="Fast Sandbox: isolated containers running in milliseconds.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def single_verb_app(name: str, verb: Any) -> typer.Typer:
    """`fsb` with only the verb `name` (argv still starts with `name`): for entry points that
    must start fast, like `python -m fastsandbox.agent` (every other verb's options would be
    built first otherwise)."""
    app = typer_app()
    app.callback()(_group_only)  # a callback keeps it a `_Group`, with its one error seam
    app.command(name)(verb)
    return app


def _group_only() -> None:
    """Fast Sandbox."""


def run(app: typer.Typer, argv: Sequence[str] | None = None, prog_name: str | None = None) -> int:
    """Run `app` on `argv` (default: the process's); returns the process exit code."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name=prog_name)
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
