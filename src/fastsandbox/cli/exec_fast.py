"""`fsb exec` without typer, for the command lines scripts and agents send thousands of times.

An agent that shells out to `fsb exec NAME -- CMD` pays the CLI's start-up on every command;
typer alone (with the pydantic adapters it builds for each option) is most of it
(docs/performance.md, "CLI"). `parse` understands exactly the documented forms — options of
`fsb exec` before NAME (`-i`, `-t`, `-it`, `-e K=V`, `-w DIR`, `-u USER`, `--timeout S`,
`--endpoint`, `--token-file`, `-n`, each also as `--opt=value`), then NAME, then `--` and the
command
(or a command none of whose words starts with `-`) — and returns None for anything else
(`--help`, an unknown option, a missing value), which typer then handles, with its messages.
Errors become one `error: ...` line and the code of the one table in `errors.py`, as everywhere.

The call itself goes through the lean client (cli/exec_lean.py) when it can reach the endpoint
as grpc would, else through the SDK (cli/exec_run.py). Nothing here imports typer, pydantic,
yaml, grpc, protobuf or asyncio (tests/unit/test_cli_imports.py).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

_FLAGS = {"-i": "interactive", "--interactive": "interactive", "-t": "tty", "--tty": "tty"}
_VALUES = {
    "-e": "env", "--env": "env", "-w": "workdir", "--workdir": "workdir", "-u": "user",
    "--user": "user", "--timeout": "timeout", "--endpoint": "endpoint",
    "--token-file": "token_file",
    "-n": "namespace", "--namespace": "namespace",
}  # fmt: skip
# typer reads these options from the environment when they are not given (the token itself,
# FSB_TOKEN, is read by the client: it is never an option; `--token` goes to typer, which
# refuses it pointing to --token-file).
_ENVVARS = {"endpoint": "FSB_ENDPOINT", "namespace": "FSB_NAMESPACE"}


class ExecArgs:  # noqa: PLW1641 (mutable, compared in tests: unhashable like a dataclass)
    """What `parse` understood (a plain class: dataclasses cost `fsb exec` start-up time)."""

    __slots__ = (
        "command", "endpoint", "env", "interactive", "name", "namespace", "timeout",
        "token_file", "tty", "user", "workdir",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        command: list[str],
        interactive: bool = False,
        tty: bool = False,
        env: list[str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        timeout: str | None = None,
        endpoint: str | None = None,
        token_file: str | None = None,
        namespace: str | None = None,
    ) -> None:
        self.name, self.command = name, command
        self.interactive, self.tty = interactive, tty
        self.env = env if env is not None else []
        self.workdir, self.user, self.timeout = workdir, user, timeout
        self.endpoint, self.token_file, self.namespace = endpoint, token_file, namespace

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, f) for f in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExecArgs) and self._fields() == other._fields()

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"ExecArgs({inner})"


def parse(argv: Sequence[str]) -> ExecArgs | None:
    """The arguments after `exec`, or None when typer should parse them."""
    values: dict[str, str | None] = {}
    flags: set[str] = set()
    env: list[str] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        word = argv[i]
        if word in ("-it", "-ti"):
            flags |= {"interactive", "tty"}
        elif word in _FLAGS:
            flags.add(_FLAGS[word])
        else:
            key, eq, inline = word.partition("=")
            dest = _VALUES.get(key)
            if dest is None or (eq and not key.startswith("--")):
                return None  # --help, `--`, an unknown option, `-e=X`: typer's to answer
            if not eq:
                i += 1
                if i >= len(argv):
                    return None
                inline = argv[i]
            if dest == "env":
                env.append(inline)
            else:
                values[dest] = inline
        i += 1
    if i >= len(argv):
        return None
    name, rest = argv[i], list(argv[i + 1 :])
    if rest[:1] == ["--"]:
        rest = rest[1:]
    elif any(word.startswith("-") for word in rest):
        return None
    if not rest:
        return None
    for dest, var in _ENVVARS.items():
        if values.get(dest) is None and os.environ.get(var):
            values[dest] = os.environ[var]
    return ExecArgs(
        name=name, command=rest, interactive="interactive" in flags, tty="tty" in flags,
        env=env, workdir=values.get("workdir"), user=values.get("user"),
        timeout=values.get("timeout"), endpoint=values.get("endpoint"),
        token_file=values.get("token_file"), namespace=values.get("namespace"),
    )  # fmt: skip


def run(args: ExecArgs) -> int:
    """Run `args`; the process exit code (the command's, or our error's)."""
    from fastsandbox.cli.exec_term import env_pairs
    from fastsandbox.errors import FsbError, InvalidArgument, exit_code_of

    try:
        timeout: float | None = None
        if args.timeout is not None:
            try:
                timeout = float(args.timeout)
            except ValueError:
                raise InvalidArgument(
                    f"--timeout: {args.timeout!r} is not a number of seconds"
                ) from None
            if timeout <= 0:
                raise InvalidArgument("--timeout: must be a positive number of seconds")
        env = env_pairs(args.env)
        from fastsandbox.cli import exec_lean
        from fastsandbox.sdk._resolve import resolve

        config = resolve(args.endpoint, None, args.namespace, token_file=args.token_file)
        if exec_lean.usable(config):
            return exec_lean.run(
                config, args.name, args.command, interactive=args.interactive, tty=args.tty,
                env=env, workdir=args.workdir, user=args.user, timeout=timeout,
                stdin_fd=_fd(sys.stdin), stdout_fd=_fd(sys.stdout), stderr_fd=_fd(sys.stderr),
            )  # fmt: skip
        return _through_the_sdk(args, env, timeout)
    except FsbError as exc:
        sys.stderr.write(f"error: {' '.join(exc.message.split())}\n")
        return exit_code_of(exc)


def _fd(stream: object) -> int:
    from fastsandbox.cli.exec_term import fileno

    return fileno(stream)


def _through_the_sdk(args: ExecArgs, env: dict[str, str], timeout: float | None) -> int:
    """The endpoints only grpc reaches (a proxy, a `dns://` authority...): the SDK's client."""
    import asyncio

    from fastsandbox.cli.exec_run import run_exec

    return asyncio.run(
        run_exec(
            args.name, args.command, interactive=args.interactive, tty=args.tty, env=env,
            workdir=args.workdir, user=args.user, timeout=timeout, endpoint=args.endpoint,
            token_file=args.token_file, namespace=args.namespace,
        )
    )  # fmt: skip
