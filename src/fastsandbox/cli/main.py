"""The `fsb` (alias `fsb-ctl`) command line: every verb on the one error seam (`cli/app.py`).

Each verb lives in `cli/commands/<verb>.py`. Errors become exit codes in `cli/app.py`'s
`_Group.invoke` and nowhere else; the codes come from the one table in `errors.py`. Scripts call
`fsb` thousands of times, so nothing heavier than typer is imported before a verb runs, and only
the verb that runs is imported (tests/unit/test_cli_imports.py). `fsb exec`'s common forms and
`fsb --version` do not even import typer: they are answered before any app is built.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    import typer

    app: typer.Typer

# verb -> (module under fastsandbox.cli.commands, attribute, options). Each verb's module (and
# what it imports: the SDK, grpc, pydantic, the servers) is imported only when that verb runs,
# or to list them all for `fsb --help`: an agent shelling out to `fsb exec` pays for exec only.
_VERBS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "run": ("run", "run", {"no_args_is_help": True}),
    "get": ("get", "get", {"no_args_is_help": True}),
    "describe": ("describe", "describe", {"no_args_is_help": True}),
    "list": ("list", "list_", {}),
    "logs": ("logs", "logs", {"no_args_is_help": True}),
    "exec": ("exec", "exec_", {"no_args_is_help": True}),
    "cp": ("cp", "cp", {"no_args_is_help": True}),
    "delete": ("delete", "delete", {"no_args_is_help": True}),
    "update": ("update", "update", {"no_args_is_help": True}),
    "reset": ("reset", "reset", {"no_args_is_help": True}),
    "apply": ("apply", "apply", {"no_args_is_help": True}),
    "pool": ("pool", "app", {}),  # a sub-app (typer.Typer), not a command
    "token": ("token", "app", {}),
    "server": ("server", "server", {}),
    "controller": ("controller", "controller", {}),
    "agent": ("agent", "agent", {}),
    "crds": ("crds", "crds", {}),
    "janitor": ("janitor", "janitor", {"no_args_is_help": True}),
}


def _version(value: bool) -> None:
    import typer

    if value:
        from fastsandbox import __version__

        typer.echo(f"fsb {__version__}")
        raise typer.Exit()


def _root_callback() -> Callable[..., None]:
    import typer

    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        """Fast Sandbox: isolated containers running in milliseconds."""

    return _root


def _add(app: typer.Typer, verb: str) -> None:
    import importlib

    import typer

    module, attr, options = _VERBS[verb]
    target: Callable[..., Any] | typer.Typer = getattr(
        importlib.import_module(f"fastsandbox.cli.commands.{module}"), attr
    )
    if isinstance(target, typer.Typer):
        app.add_typer(target, name=verb)
    else:
        app.command(verb, **options)(target)


def build_app(verbs: Sequence[str] | None = None) -> typer.Typer:
    """`fsb` with `verbs` (default: every verb, in the order `fsb --help` lists them)."""
    from fastsandbox.cli import app as seam

    app = seam.typer_app()
    app.callback()(_root_callback())
    for verb in verbs if verbs is not None else _VERBS:
        _add(app, verb)
    return app


def _verb_of(argv: Sequence[str]) -> str | None:
    """The verb `argv` runs, when it is the first argument (`fsb exec ...`); None otherwise
    (`fsb --help`, `fsb --version`, a typo: the whole app answers those)."""
    if argv and argv[0] in _VERBS:
        return argv[0]
    return None


def __getattr__(name: str) -> Any:
    # `app`, the whole `fsb`, is built on first use (tests, `python -m`), not at import time.
    if name == "app":
        built = build_app()
        globals()["app"] = built
        return built
    raise AttributeError(name)


def main(argv: Sequence[str] | None = None, prog_name: str | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    args = list(argv) if argv is not None else sys.argv[1:]
    if args == ["--version"]:
        # Scripts ask this to probe for fsb: answered without building any verb.
        from fastsandbox import __version__

        print(f"fsb {__version__}")
        return 0
    verb = _verb_of(args)
    if verb == "exec":
        from fastsandbox.cli import exec_fast

        parsed = exec_fast.parse(args[1:])
        if parsed is not None:
            return exec_fast.run(parsed)
    if verb == "run":
        from fastsandbox.cli import run_fast

        options = run_fast.parse(args[1:])
        code = run_fast.run(options) if options is not None else None
        if code is not None:
            return code
    from fastsandbox.cli import app as seam

    return seam.run(build_app([verb]) if verb else build_app(), args, prog_name or "fsb")


if __name__ == "__main__":
    sys.exit(main())
