"""`fsb run` on the lean client (cli/run_fast.py) sends the CreateRequest the SDK path sends and
prints the same answer; what it does not take (here `-o table`) goes to typer as before. The
guard against a slow start is an import list, not a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastsandbox.cli import run_fast
from fastsandbox.sdk._core import DEFAULT_POOL
from tests.unit.fastpath_fake import TOKEN
from tests.unit.io_fastpath_fake import Rig, serve_io


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Rig, dict[str, str]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSB_", "XDG_"))}
    env.update(HOME=str(tmp_path / "home"), FSB_DATA_DIR=str(tmp_path / "data"), FSB_TOKEN=TOKEN)
    with serve_io(tmp_path) as served:
        env.update(FSB_ENDPOINT=served.endpoint, FSB_INSECURE="1")
        yield served, env


def _fsb(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastsandbox.cli.main", "run", *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


OPTIONS = [
    [],
    ["--pool", "p1", "-e", "A=1", "-e", "B=x=y", "-e", "A=2", "-w", "/w", "-p", "80", "--port=81",
     "--ttl", "60", "-l", "team=a", "--mode", "strong", "--cpu", "500m", "--memory", "64Mi",
     "--idempotency-key", "k1", "-n", "default", "--", "sh", "-c", "sleep 1"],
    ["--pids", "8", "--disk=1Gi", "--", "true"],
]  # fmt: skip


@pytest.mark.parametrize("options", OPTIONS)
def test_the_same_request_and_answer_as_the_sdk_path(
    rig: tuple[Rig, dict[str, str]], options: list[str]
) -> None:
    served, env = rig
    lean = _fsb(env, "lean", "--image", "busybox", *options)
    head, sep, tail = (options, [], []) if "--" not in options else (
        options[: options.index("--")], ["--"], options[options.index("--") + 1 :]
    )  # fmt: skip
    sdk = _fsb(env, "sdk", "--image", "busybox", *head, "-o", "table", *sep, *tail)
    assert (lean.returncode, sdk.returncode) == (0, 0), (lean.stderr, sdk.stderr)
    assert lean.stdout.replace("lean", "sdk") == sdk.stdout
    assert "sandbox:" in lean.stdout and "timings:" in lean.stdout
    creates = [c for c in served.fastpath.calls if c.method == "Create"]
    assert [c.request.name for c in creates] == ["lean", "sdk"]
    creates[0].request.name = "sdk"
    assert creates[0].request == creates[1].request
    assert creates[0].metadata["authorization"] == creates[1].metadata["authorization"]


def test_errors_are_the_same_line_and_code(rig: tuple[Rig, dict[str, str]]) -> None:
    served, env = rig
    served.fastpath.add_sandbox("taken")
    for args in (
        ["taken", "--image", "busybox"],  # the server's ALREADY_EXISTS
        ["x", "--image", "busybox", "-e", "NOEQ"],  # our own check
        ["x", "--image", "busybox", "--ttl", "0"],
        ["x", "--image", "busybox", "--mode", "slow"],
        ["x", "--image", "busybox", "-l", "=v"],
    ):
        lean, sdk = _fsb(env, *args), _fsb(env, *args, "-o", "table")
        assert lean.returncode != 0 and lean.stderr.startswith("error: "), args
        assert (lean.returncode, lean.stderr) == (sdk.returncode, sdk.stderr), args
    gone = _fsb(env | {"FSB_ENDPOINT": "127.0.0.1:1"}, "x", "--image", "busybox")
    assert gone.returncode == 7 and "cannot reach fsb server" in gone.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["a", "b", "--image", "i"],  # a command without `--`: typer places it
        ["a", "--image", "i", "-o", "json"],
        ["a", "-f", "spec.yaml"],
        ["a", "--ttl", "soon"],  # typer's usage error
        ["a", "--lease", "30"],
        ["a", "-e=A=1"],
        ["--image", "i"],  # no NAME
        ["a", "--image"],
    ],
)
def test_anything_else_is_left_to_typer(argv: list[str]) -> None:
    assert run_fast.parse(argv) is None


def test_the_default_pool_is_the_sdks() -> None:
    assert run_fast.DEFAULT_POOL == DEFAULT_POOL


def test_the_lean_path_imports_nothing_heavy(rig: tuple[Rig, dict[str, str]]) -> None:
    from tests.unit.test_cli_exec_lean import HEAVY

    _, env = rig
    probe = (
        "import json, sys\n"
        "from fastsandbox.cli.main import main\n"
        "code = main(['run', 'probe', '--image', 'busybox'])\n"
        "print(json.dumps([code, sorted(sys.modules)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60,
        check=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    code, loaded = json.loads(out.stdout.splitlines()[-1])
    assert code == 0 and out.stdout.startswith("sandbox:") and "default/probe" in out.stdout
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == []
