"""`fsb exec`'s typer-free parser takes exactly the documented forms and leaves the rest to
typer; both paths end in the same `run_exec` and report errors the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastsandbox.cli.exec_fast import ExecArgs, parse


def test_the_common_forms_are_parsed() -> None:
    assert parse(["sb", "--", "ls", "-l"]) == ExecArgs(name="sb", command=["ls", "-l"])
    assert parse(["sb", "echo", "hi"]) == ExecArgs(name="sb", command=["echo", "hi"])
    got = parse(
        ["-it", "-e", "A=1", "--env=B=2", "-w", "/tmp", "-u", "1000", "--timeout", "3",
         "-n", "ns", "--endpoint=h:1", "--token-file", "t", "sb", "--", "sh"]
    )  # fmt: skip
    assert got == ExecArgs(
        name="sb", command=["sh"], interactive=True, tty=True, env=["A=1", "B=2"],
        workdir="/tmp", user="1000", timeout="3", endpoint="h:1", token_file="t", namespace="ns",
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["-h"],
        ["sb"],  # no command
        ["sb", "--"],
        ["--bogus", "sb", "--", "true"],
        ["-e"],  # a missing value
        ["sb", "ls", "-l"],  # an option-looking word without `--`: typer decides
        ["-e=A=1", "sb", "--", "true"],
        ["--token", "t", "sb", "--", "true"],  # refused by typer, pointing to --token-file
    ],
)
def test_anything_else_is_left_to_typer(argv: list[str]) -> None:
    assert parse(argv) is None


def test_the_environment_fills_what_typer_would(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSB_ENDPOINT", "e:1")
    monkeypatch.setenv("FSB_NAMESPACE", "envns")
    got = parse(["-n", "given", "sb", "--", "true"])
    assert got is not None and got.endpoint == "e:1" and got.namespace == "given"


def _fsb(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FSB_")}
    env.update(HOME=str(home), XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "fastsandbox.cli.main", *args],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip


def test_both_paths_report_an_error_alike(tmp_path: Path) -> None:
    fast = _fsb(["exec", "sb", "--", "true"], tmp_path)  # no token anywhere
    slow = _fsb(["exec", "-eA=1", "sb", "--", "true"], tmp_path)  # typer's path
    assert fast.returncode == slow.returncode != 0
    assert fast.stderr.startswith("error: no API token")
    assert fast.stderr == slow.stderr


def test_a_bad_timeout_is_invalid_argument(tmp_path: Path) -> None:
    fast = _fsb(["exec", "--timeout", "0", "sb", "--", "true"], tmp_path)
    slow = _fsb(["exec", "-eA=1", "--timeout", "0", "sb", "--", "true"], tmp_path)
    assert fast.returncode == slow.returncode == 2
    assert "--timeout: must be a positive number of seconds" in fast.stderr
