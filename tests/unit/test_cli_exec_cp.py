"""`fsb exec` and `fsb cp` through the real relay to a process-running fake agent: exit codes,
stdin, env/workdir, timeouts, a real PTY for `-t` (raw mode, size, resize), and copies both
ways with mode and mtime kept; wrong paths are one line naming them."""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastsandbox.api.models import SandboxPhase
from fastsandbox.cli.commands.cp import split_remote
from fastsandbox.cli.main import app
from tests.unit.fastpath_fake import TOKEN, isolate_env
from tests.unit.io_fastpath_fake import Rig, serve_io

runner = CliRunner()


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    isolate_env(monkeypatch, tmp_path)
    with serve_io(tmp_path) as rig:
        rig.fastpath.add_sandbox("box")
        monkeypatch.setenv("FSB_ENDPOINT", rig.endpoint)
        monkeypatch.setenv("FSB_TOKEN", TOKEN)
        yield rig


def test_exec_passes_stdin_and_the_exit_code(rig: Rig) -> None:
    result = runner.invoke(
        app, ["exec", "box", "-i", "--", "sh", "-c", "cat; echo oops >&2; exit 5"], input="hi\n"
    )
    assert result.exit_code == 5, result.output
    assert result.stdout == "hi\n"
    assert result.stderr == "oops\n"


def test_exec_env_workdir_and_no_stdin_without_i(rig: Rig) -> None:
    (rig.root / "work").mkdir()
    result = runner.invoke(
        app,
        [
            "exec",
            "box",
            "-e",
            "A=1",
            "-e",
            "B=x=y",
            "-w",
            "/work",
            "--",
            "sh",
            "-c",
            'echo "$A $B $(basename $PWD)"; cat',
        ],
        input="ignored\n",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "1 x=y work\n"


def test_exec_timeout_kills_and_exits_124(rig: Rig) -> None:
    result = runner.invoke(app, ["exec", "box", "--timeout", "0.5", "--", "sleep", "30"])
    assert result.exit_code == 124
    assert "command timed out after 0.5s: sleep 30" in result.stderr
    assert "Traceback" not in result.output


def test_exec_into_a_stopped_sandbox_is_one_line_naming_the_phase(rig: Rig) -> None:
    rig.fastpath.sandboxes[("default", "box")].status.phase = SandboxPhase.SUCCEEDED
    result = runner.invoke(app, ["exec", "box", "--", "true"])
    assert result.exit_code == 4
    assert result.stderr.strip().count("\n") == 0
    assert "Succeeded, not Running" in result.stderr
    missing = runner.invoke(app, ["exec", "nope", "--", "true"])
    assert missing.exit_code == 3


def test_exec_bad_input_is_a_usage_error(rig: Rig) -> None:
    assert runner.invoke(app, ["exec", "box", "-w", "rel", "--", "true"]).exit_code == 2
    assert runner.invoke(app, ["exec", "box", "--timeout", "0", "--", "true"]).exit_code == 2


def _read_until(fd: int, needle: bytes, timeout: float = 20.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen in {seen!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_exec_t_gives_a_tty_raw_mode_and_follows_resizes(rig: Rig) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    before = termios.tcgetattr(slave)
    script = 'tty; stty size; trap "stty size" WINCH; echo ready; while :; do sleep 0.05; done'
    env = os.environ | {"FSB_ENDPOINT": rig.endpoint, "FSB_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [
            "setsid",
            "-c",
            sys.executable,
            "-m",
            "fastsandbox.cli.main",
            "exec",
            "-it",
            "box",
            "--",
            "sh",
            "-c",
            script,
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    try:
        seen = _read_until(master, b"ready")
        assert b"/dev/pts/" in seen  # the command has a terminal
        assert b"24 80" in seen  # of our size
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0  # our terminal is raw
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
        _read_until(master, b"33 111")
        os.write(master, b"\x03")  # Ctrl-C, as a byte, interrupts the remote command
        code = proc.wait(timeout=20)
        tail = b""
        while select.select([master], [], [], 0.2)[0]:
            try:
                tail += os.read(master, 4096)
            except OSError:
                break
        assert code == 130, tail
        assert termios.tcgetattr(slave) == before  # restored on the way out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


def test_split_remote() -> None:
    assert split_remote("box:/tmp/x") == ("box", "/tmp/x")
    assert split_remote("box:") == ("box", "/")
    assert split_remote("./a:b") is None
    assert split_remote("/abs:x") is None
    assert split_remote("plain") is None


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cp_a_file_both_ways_keeps_bytes_mode_and_mtime(rig: Rig, tmp_path: Path) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    os.chmod(src, 0o750)
    os.utime(src, (1_600_000_000, 1_600_000_000))
    up = runner.invoke(app, ["cp", str(src), "box:/tmp/"])
    assert up.exit_code == 0, up.output
    inside = rig.root / "tmp" / "blob.bin"
    assert _sha(inside) == _sha(src)
    assert inside.stat().st_mode & 0o7777 == 0o750 and inside.stat().st_mtime == 1_600_000_000
    back = tmp_path / "back.bin"
    down = runner.invoke(app, ["cp", "box:/tmp/blob.bin", str(back)])
    assert down.exit_code == 0, down.output
    assert _sha(back) == _sha(src)
    assert back.stat().st_mode & 0o7777 == 0o750 and back.stat().st_mtime == 1_600_000_000
    assert not list(tmp_path.glob(".*fsb-part"))


def test_cp_a_directory_both_ways(rig: Rig, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("a")
    (tree / "sub" / "b.sh").write_text("#!/bin/sh\n")
    os.chmod(tree / "sub" / "b.sh", 0o755)
    os.utime(tree / "sub", (1_500_000_000, 1_500_000_000))
    up = runner.invoke(app, ["cp", str(tree), "box:/tmp/copied"])
    assert up.exit_code == 0, up.output
    inside = rig.root / "tmp" / "copied"
    assert (inside / "a.txt").read_text() == "a"
    assert (inside / "sub" / "b.sh").stat().st_mode & 0o777 == 0o755
    assert (inside / "sub").stat().st_mtime == 1_500_000_000
    out = tmp_path / "out"
    out.mkdir()
    down = runner.invoke(app, ["cp", "box:/tmp/copied", str(out)])
    assert down.exit_code == 0, down.output
    assert (out / "copied" / "sub" / "b.sh").read_text() == "#!/bin/sh\n"
    assert (out / "copied" / "sub" / "b.sh").stat().st_mode & 0o777 == 0o755
    assert (out / "copied" / "sub").stat().st_mtime == 1_500_000_000


def test_cp_wrong_paths_are_one_line_naming_them(rig: Rig, tmp_path: Path) -> None:
    cases = [
        (["cp", str(tmp_path / "nope"), "box:/tmp/"], 3, f"{tmp_path / 'nope'}: no such file"),
        (["cp", "box:/tmp/missing", str(tmp_path)], 3, "/tmp/missing"),
        (["cp", "box:tmp/rel", str(tmp_path)], 2, "path: must be an absolute path"),
        (["cp", "a", "b"], 2, "exactly one of SRC and DST"),
        (["cp", "box:/tmp", str(tmp_path / "no" / "such" / "dir") + "/"], 3, "no such file"),
    ]
    for args, code, text in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        assert text in result.stderr, (args, result.stderr)
        assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def _cli(rig: Rig, *args: str, **kw: object) -> subprocess.Popen[bytes]:
    env = os.environ | {"FSB_ENDPOINT": rig.endpoint, "FSB_TOKEN": TOKEN}
    return subprocess.Popen(
        [sys.executable, "-m", "fastsandbox.cli.main", *args],
        env=env,
        **kw,  # type: ignore[call-overload]
    )


def test_ctrl_c_is_forwarded_to_the_command(rig: Rig) -> None:
    script = 'trap "echo got INT; exit 9" INT; echo ready; while :; do sleep 0.1; done'
    proc = _cli(rig, "exec", "box", "--", "sh", "-c", script, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert out == b"got INT\n"
        assert proc.returncode == 9  # the command's own exit, not a KeyboardInterrupt
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_closed_pipe_ends_quietly(rig: Rig) -> None:
    proc = _cli(rig, "exec", "box", "--", "yes", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(4) == b"y\ny\n"
    proc.stdout.close()
    assert proc.wait(timeout=30) == 141
    err = proc.stderr.read()
    proc.stderr.close()
    assert b"Traceback" not in err, err
