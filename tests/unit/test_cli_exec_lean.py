"""`fsb exec` through the lean client (cli/exec_lean.py) against a real grpc server — the fake
Fast-Path relaying to a fake agent that runs real processes — over plaintext and over TLS with
the data dir's CA: the same bytes, exit codes and error lines as the SDK path, which the same
command line takes when an option follows NAME (typer parses it then; cli/exec_fast.py).

The guard against a slow start is not a timing: the lean path must not import typer, pydantic,
yaml, structlog, grpc, protobuf or asyncio (benchmarks/cli_start.py has the numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastsandbox.api.models import SandboxPhase
from tests.unit.fastpath_fake import TOKEN
from tests.unit.io_fastpath_fake import Rig, serve_io

# Modules whose import `fsb exec NAME -- CMD` must not pay (each costs more start-up than the
# whole lean call; docs/performance.md, "CLI").
HEAVY = (
    "typer", "click", "pydantic", "pydantic_core", "yaml", "structlog", "rich", "grpc",
    "google.protobuf", "asyncio", "fastsandbox.api._proto", "fastsandbox.api.models",
    "fastsandbox.sdk.aio", "fastsandbox.settings", "cryptography",
)  # fmt: skip


@pytest.fixture(params=["plain", "tls"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Rig, dict[str, str]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSB_", "XDG_"))}
    data = tmp_path / "data"
    data.mkdir()
    env.update(HOME=str(tmp_path / "home"), FSB_DATA_DIR=str(data), FSB_TOKEN=TOKEN)
    credentials = None
    if request.param == "tls":
        from fastsandbox.control.fastpath.tls import data_dir_tls, server_names

        # The server's CA in its data dir, where the client finds it (as `fsb server` does).
        credentials = data_dir_tls(data / "tls", server_names("127.0.0.1:0")).credentials()
    with serve_io(tmp_path, credentials) as served:
        served.fastpath.add_sandbox("box")
        env["FSB_ENDPOINT"] = served.endpoint
        if request.param == "plain":
            env["FSB_INSECURE"] = "1"
        yield served, env


def _fsb(env: dict[str, str], *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fastsandbox.cli.main", "exec", *args],
        input=stdin, capture_output=True, env=env, timeout=60, check=False,
    )  # fmt: skip


def _both(
    env: dict[str, str], options: list[str], command: list[str], stdin: bytes = b""
) -> tuple[subprocess.CompletedProcess[bytes], subprocess.CompletedProcess[bytes]]:
    """The same exec on the lean path (options before NAME) and on the SDK's (after it)."""
    lean = _fsb(env, *options, "box", "--", *command, stdin=stdin)
    sdk = (
        _fsb(env, "box", *options, "--", *command, stdin=stdin)
        if options
        else _fsb(env, "box", "--timeout", "600", "--", *command, stdin=stdin)
    )
    return lean, sdk


def _same(
    lean: subprocess.CompletedProcess[bytes], sdk: subprocess.CompletedProcess[bytes]
) -> None:
    assert (lean.returncode, lean.stdout, lean.stderr) == (sdk.returncode, sdk.stdout, sdk.stderr)


def test_stdio_and_the_exit_code(rig: tuple[Rig, dict[str, str]]) -> None:
    _, env = rig
    lean, sdk = _both(env, ["-i"], ["sh", "-c", "cat; echo oops >&2; exit 5"], stdin=b"hi\n")
    assert (lean.returncode, lean.stdout, lean.stderr) == (5, b"hi\n", b"oops\n")
    _same(lean, sdk)


def test_env_workdir_user_and_no_stdin_without_i(rig: tuple[Rig, dict[str, str]]) -> None:
    served, env = rig
    (served.root / "work").mkdir()
    script = 'echo "$A $B $(basename $PWD)"; cat'
    lean, sdk = _both(env, ["-e", "A=1", "-e", "B=x=y", "-w", "/work"], ["sh", "-c", script], b"no")
    assert (lean.returncode, lean.stdout) == (0, b"1 x=y work\n")
    _same(lean, sdk)


def test_megabytes_each_way_arrive_whole(rig: tuple[Rig, dict[str, str]]) -> None:
    """Past every flow-control window (64 KiB default, 16 MiB ours): no byte lost or reordered."""
    _, env = rig
    data = os.urandom(3 * 1024 * 1024)
    lean = _fsb(env, "-i", "box", "--", "sh", "-c", "cat; cat /dev/null", stdin=data)
    assert lean.returncode == 0 and lean.stdout == data
    big = _fsb(env, "box", "--", "sh", "-c", "head -c 20000000 /dev/zero")
    assert big.returncode == 0 and big.stdout == b"\0" * 20_000_000


def test_a_timeout_kills_and_exits_124(rig: tuple[Rig, dict[str, str]]) -> None:
    _, env = rig
    lean, sdk = _both(env, ["--timeout", "0.5"], ["sleep", "30"])
    assert lean.returncode == 124
    assert lean.stderr == b"error: command timed out after 0.5s: sleep 30\n"
    _same(lean, sdk)
    # The fake agent's loop must see its killed child's exit before the rig stops it (else the
    # child's Popen is collected later, unreaped, as a ResourceWarning in another test).
    time.sleep(0.5)


def test_server_errors_are_the_same_line_and_code(rig: tuple[Rig, dict[str, str]]) -> None:
    served, env = rig
    lean, sdk = _both(env, ["-w", "rel"], ["true"])  # the server refuses the field
    assert lean.returncode == 2 and b"start.cwd" in lean.stderr
    _same(lean, sdk)
    missing = _fsb(env, "nope", "--", "true")
    assert missing.returncode == 3 and missing.stderr == b"error: sandbox default/nope not found\n"
    assert _fsb(env, "nope", "-i", "--", "true").stderr == missing.stderr
    served.fastpath.sandboxes[("default", "box")].status.phase = SandboxPhase.SUCCEEDED
    stopped, stopped_sdk = _both(env, ["-i"], ["true"])
    assert stopped.returncode == 4 and b"Succeeded, not Running" in stopped.stderr
    _same(stopped, stopped_sdk)


def test_a_wrong_token_and_no_server(rig: tuple[Rig, dict[str, str]]) -> None:
    _, env = rig
    bad = env | {"FSB_TOKEN": "not-the-token"}
    lean, sdk = _both(bad, ["-i"], ["true"])
    assert lean.returncode == 6
    _same(lean, sdk)
    gone = env | {"FSB_ENDPOINT": "127.0.0.1:1"}
    lean, sdk = _both(gone, ["-i"], ["true"])
    assert lean.returncode == 7 and lean.stderr.startswith(b"error: cannot reach fsb server at")
    _same(lean, sdk)


def test_a_proxy_in_the_environment_leaves_the_call_to_grpc(
    rig: tuple[Rig, dict[str, str]],
) -> None:
    """grpc would go through the proxy (and `no_proxy` decides): we do not pretend to."""
    from fastsandbox.cli import exec_lean
    from fastsandbox.sdk._resolve import ClientConfig

    config = ClientConfig("127.0.0.1:9", "default", "t")
    assert exec_lean.usable(config)
    os.environ["https_proxy"] = "http://127.0.0.1:3128"
    try:
        assert not exec_lean.usable(config)
        assert exec_lean.usable(ClientConfig("unix:/run/x.sock", "default", "t"))
    finally:
        del os.environ["https_proxy"]
    _, env = rig
    via = _fsb(
        env | {"no_proxy": "127.0.0.1", "https_proxy": "http://127.0.0.1:1"}, "box", "--", "true"
    )
    assert via.returncode == 0, via.stderr  # through the SDK, which honours no_proxy


def test_the_lean_path_imports_nothing_heavy(rig: tuple[Rig, dict[str, str]]) -> None:
    """`fsb exec NAME -- CMD` end to end (a real call, over this rig's transport), then the
    modules it loaded: none of the heavy ones."""
    _, env = rig
    probe = (
        "import json, sys\n"
        "from fastsandbox.cli.main import main\n"
        "code = main(['exec', 'box', '--', 'sh', '-c', 'echo ran'])\n"
        "print(json.dumps([code, sorted(sys.modules)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, env=env, timeout=60, check=True
    )
    first, last = out.stdout.splitlines()[0], out.stdout.splitlines()[-1]
    code, loaded = json.loads(last)
    assert (code, first) == (0, b"ran")
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == []
