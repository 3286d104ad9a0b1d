"""fsb-supervisor's channel, black box: the real binary as a plain child process (not PID 1,
no root needed) dials a fake agent (tests/unit/supervisor_agent.py) listening in a temp dir.

Timeouts only bound a failing test; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.unit.supervisor_agent import BOUND, DATA, EOF, JSON, STDOUT, Conn, FakeAgent

REPO = Path(__file__).resolve().parents[2]
SANDBOX_ID = "sbx-test-1"
PATH_ENV = f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}"


@pytest.fixture(scope="session")
def supervisor_bin() -> Path:
    """Built from the working tree (scripts/build-native is a no-op when nothing changed)."""
    cargo = Path.home() / ".cargo" / "bin" / "cargo"
    if shutil.which("cargo") is None and not cargo.exists():
        pytest.skip("no cargo to build native/supervisor (scripts/setup installs one)")
    result = subprocess.run(
        [str(REPO / "scripts" / "build-native")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    path = REPO / "native" / "bin" / "fsb-supervisor"
    assert str(path) in result.stdout.split()
    return path


@dataclass
class Sandbox:
    agent: FakeAgent
    proc: subprocess.Popen[bytes]
    dir: Path
    secret: bytes
    log: Path


async def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def start_supervisor(
    binary: Path, channel: Path, secret_hex: str, log: Path, *argv: str
) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "FSB_CHANNEL": str(channel),
        "FSB_SUPERVISOR_SECRET": secret_hex,
        "FSB_SANDBOX_ID": SANDBOX_ID,
        "FSB_OTHER": "scrubbed too",
    }
    with log.open("ab") as err:
        return subprocess.Popen(
            [str(binary), *(["--", *argv] if argv else [])],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM: idle, the supervisor kills the process groups it started, then exits 0."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
async def sandbox(supervisor_bin: Path, tmp_path: Path) -> AsyncIterator[Sandbox]:
    channel = tmp_path / "run"
    channel.mkdir()
    secret = secrets.token_bytes(32)
    agent = await FakeAgent(channel, secret).start()
    log = tmp_path / "supervisor.log"
    proc = start_supervisor(supervisor_bin, channel, secret.hex(), log)
    sb = Sandbox(agent, proc, tmp_path, secret, log)
    try:
        yield sb
    finally:
        stop(proc)
        await sb.agent.stop()  # a test may have replaced the agent (a restart)


def err(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["ok"] is False, reply
    error: dict[str, Any] = reply["error"]
    return error


# -- handshake --------------------------------------------------------------------------------


async def test_handshake_proves_both_sides(sandbox: Sandbox) -> None:
    await sandbox.agent.wait_control()
    hello = sandbox.agent.hellos[0]
    assert hello["v"] == 1 and hello["role"] == "control" and hello["sandbox"] == SANDBOX_ID
    assert hello["pid"] == sandbox.proc.pid
    assert re.fullmatch(r"[0-9a-f]{64}", hello["nonce"])
    assert "stream" not in hello
    assert (await sandbox.agent.request("ps"))["ok"] is True


async def test_agent_with_the_wrong_secret_refuses_and_the_supervisor_redials(
    supervisor_bin: Path, tmp_path: Path
) -> None:
    agent = await FakeAgent(tmp_path, secrets.token_bytes(32)).start()
    proc = start_supervisor(supervisor_bin, tmp_path, secrets.token_hex(32), tmp_path / "log")
    try:
        await wait_until(lambda: agent.refused >= 3, "repeated refused dials")
        assert not agent.control.done()
        assert proc.poll() is None  # a refused channel is retried, never fatal
    finally:
        stop(proc)
        await agent.stop()


async def test_supervisor_refuses_an_agent_whose_proof_is_wrong(
    supervisor_bin: Path, tmp_path: Path
) -> None:
    """An impostor listening on the socket (without the secret) gets no service."""
    secret = secrets.token_bytes(32)
    agent = await FakeAgent(tmp_path, secret, lie=True).start()
    proc = start_supervisor(supervisor_bin, tmp_path, secret.hex(), tmp_path / "log")
    try:
        conn = await agent.wait_control()
        with contextlib.suppress(ConnectionError):  # it may have closed already
            conn.send_json({"id": 1, "op": "ps"})
        await wait_until(lambda: agent.lost >= 1, "the supervisor to close the connection")
        await wait_until(lambda: len(agent.hellos) >= 2, "a redial after the refusal")
    finally:
        stop(proc)
        await agent.stop()


def test_malformed_secret_is_a_usage_error(supervisor_bin: Path, tmp_path: Path) -> None:
    proc = start_supervisor(supervisor_bin, tmp_path, "not-hex", tmp_path / "log")
    assert proc.wait(timeout=BOUND) == 2
    stop(proc)
    assert b"FSB_SUPERVISOR_SECRET must be 64 hex" in (tmp_path / "log").read_bytes()


async def test_bad_frames_close_the_control_connection(sandbox: Sandbox) -> None:
    conn = await sandbox.agent.wait_control()
    conn.send(9, b"x")  # unknown type
    await wait_until(lambda: sandbox.agent.lost >= 1, "the supervisor to close the connection")
    await wait_until(lambda: len(sandbox.agent.hellos) >= 2, "the supervisor to redial")


# -- processes --------------------------------------------------------------------------------


async def test_exec_keeps_stdout_and_stderr_apart_and_passes_the_exit_code(
    sandbox: Sandbox,
) -> None:
    out = await sandbox.agent.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (out.stdout, out.stderr) == (b"out\n", b"err\n")
    assert out.exit == {"code": 3, "signal": None, "timed_out": False}


async def test_exec_env_cwd_and_no_fsb_variables(sandbox: Sandbox, tmp_path: Path) -> None:
    out = await sandbox.agent.run(
        ["sh", "-c", "pwd; env"], env=["A=1", PATH_ENV], cwd=str(tmp_path)
    )
    lines = out.stdout.decode().splitlines()
    assert lines[0] == str(tmp_path)
    assert "A=1" in lines
    assert not [x for x in lines if x.startswith("FSB_")]


async def test_stdin_is_streamed_and_closed(sandbox: Sandbox) -> None:
    reply, conn = await sandbox.agent.stream("exec", argv=["cat"], env=[PATH_ENV])
    assert reply["ok"] and reply["pid"] > 0 and conn is not None
    conn.send(DATA, b"hello ")
    conn.send(DATA, b"world")
    conn.send(EOF)
    out = await conn.collect()
    assert out.stdout == b"hello world" and out.exit["code"] == 0


async def test_stdin_off_reads_dev_null(sandbox: Sandbox) -> None:
    _, conn = await sandbox.agent.stream("exec", argv=["cat"], env=[PATH_ENV], stdin=False)
    assert conn is not None
    out = await conn.collect()  # no EOF sent: cat ends on /dev/null by itself
    assert out.stdout == b"" and out.exit["code"] == 0


async def test_signals_reach_the_process_group(sandbox: Sandbox) -> None:
    reply, conn = await sandbox.agent.stream("exec", argv=["sleep", "100"], env=[PATH_ENV])
    assert conn is not None
    conn.send_json({"signal": signal.SIGTERM})
    out = await conn.collect()
    assert out.exit == {"code": 128 + signal.SIGTERM, "signal": signal.SIGTERM, "timed_out": False}

    reply, conn = await sandbox.agent.stream("exec", argv=["sleep", "100"], env=[PATH_ENV])
    assert conn is not None
    assert (await sandbox.agent.request("signal", pid=reply["pid"], signal=9))["ok"]
    assert (await conn.collect()).exit["signal"] == 9
    gone = await sandbox.agent.request("signal", pid=424242, signal=9)
    assert err(gone)["code"] == "ESRCH"


async def test_timeout_kills_and_reports(sandbox: Sandbox) -> None:
    out = await sandbox.agent.run(["sleep", "100"], timeout_ms=100)
    assert out.exit == {"code": 137, "signal": 9, "timed_out": True}


async def test_exec_errors_name_what_failed(sandbox: Sandbox, tmp_path: Path) -> None:
    missing = await sandbox.agent.request("exec", stream="t1", argv=["nosuch-fsb"], env=[PATH_ENV])
    assert err(missing) == {
        "code": "ENOENT",
        "message": "exec nosuch-fsb: No such file or directory",
        "path": "nosuch-fsb",
    }
    data = tmp_path / "data.txt"
    data.write_text("x")
    denied = await sandbox.agent.request("exec", stream="t2", argv=[str(data)])
    assert err(denied)["code"] == "EACCES"
    cwd = await sandbox.agent.request("exec", stream="t3", argv=["true"], cwd="/nonexistent-fsb")
    assert err(cwd)["code"] == "ENOENT" and "/nonexistent-fsb" in err(cwd)["message"]
    user = await sandbox.agent.request("exec", stream="t4", argv=["true"], user="nobody-fsb")
    assert err(user) == {
        "code": "EINVAL",
        "message": 'unknown user "nobody-fsb" (not in /etc/passwd)',
    }
    empty = await sandbox.agent.request("exec", stream="t5", argv=[])
    assert err(empty)["code"] == "EINVAL" and "argv" in err(empty)["message"]
    unknown = await sandbox.agent.request("start_main", argv=["true"])
    assert err(unknown)["code"] == "EINVAL" and "unknown op" in err(unknown)["message"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
async def test_exec_as_a_passwd_user(sandbox: Sandbox) -> None:
    out = await sandbox.agent.run(["sh", "-c", "id -u; id -g; echo $HOME"], user="nobody")
    uid, gid, home = out.stdout.decode().split()
    assert (int(uid), int(gid), home) == (65534, 65534, "/nonexistent")
    out = await sandbox.agent.run(["id", "-u"], user="1234:5678")
    assert out.stdout == b"1234\n"


async def test_pty_is_a_terminal_of_the_given_size_and_resizes(sandbox: Sandbox) -> None:
    out = await sandbox.agent.run(["tty"], pty={"cols": 100, "rows": 30})
    assert re.fullmatch(rb"/dev/pts/\d+\r?\n", out.stdout), out.stdout
    assert out.stderr == b""

    reply, conn = await sandbox.agent.stream(
        "exec",
        argv=["sh", "-c", "stty size; read x; stty size"],
        env=[PATH_ENV],
        pty={"cols": 100, "rows": 30},
    )
    assert conn is not None
    seen = b""
    while b"30 100" not in seen:
        frame = await asyncio.wait_for(conn.read(), BOUND)
        assert frame is not None and frame[0] == STDOUT, frame
        seen += frame[1]
    conn.send_json({"resize": {"cols": 120, "rows": 40}})
    conn.send(DATA, b"\n")
    out = await conn.collect()
    assert b"40 120" in out.stdout and out.exit["code"] == 0
    ps = (await sandbox.agent.request("ps"))["processes"]
    assert [p["pty"] for p in ps if p["pid"] == reply["pid"]] == [True]


async def test_attach_after_the_data_connection_dropped_replays_the_ring(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    script = f"echo one; while [ ! -e {go} ]; do sleep 0.02; done; echo two; echo err >&2; exit 5"
    reply, conn = await sandbox.agent.stream(
        "exec", argv=["sh", "-c", script], env=[PATH_ENV], tag="job"
    )
    assert conn is not None
    pid = reply["pid"]
    frame = await asyncio.wait_for(conn.read(), BOUND)
    assert frame == (STDOUT, b"one\n")
    conn.close()

    async def attached() -> bool:
        ps = (await sandbox.agent.request("ps"))["processes"]
        return bool([p for p in ps if p["pid"] == pid and not p["attached"]])

    deadline = time.monotonic() + BOUND
    while not await attached():
        assert time.monotonic() < deadline, "the supervisor never noticed the drop"
        await asyncio.sleep(0.02)
    go.touch()  # output from now on has nobody to go to: it waits in the ring

    async def exited() -> bool:
        ps = (await sandbox.agent.request("ps"))["processes"]
        return [p["running"] for p in ps if p["pid"] == pid] == [False]

    while not await exited():
        assert time.monotonic() < deadline, "the process never exited"
        await asyncio.sleep(0.02)
    ps = next(p for p in (await sandbox.agent.request("ps"))["processes"] if p["pid"] == pid)
    assert ps["exit_code"] == 5 and ps["tag"] == "job" and ps["main"] is False

    reply, conn = await sandbox.agent.stream("attach", pid=pid)
    assert reply["ok"] and conn is not None
    out = await conn.collect()
    assert (out.stdout, out.stderr, out.exit["code"]) == (b"two\n", b"err\n", 5)

    assert err(await sandbox.agent.request("attach", pid=999999, stream="x"))["code"] == "ESRCH"


async def test_a_new_attach_replaces_the_previous_one(sandbox: Sandbox) -> None:
    reply, first = await sandbox.agent.stream("exec", argv=["cat"], env=[PATH_ENV])
    assert first is not None
    _, second = await sandbox.agent.stream("attach", pid=reply["pid"])
    assert second is not None
    assert await asyncio.wait_for(first.read(), BOUND) is None  # the old one is closed
    second.send(DATA, b"via second")
    second.send(EOF)
    out = await second.collect()
    assert out.stdout == b"via second"


async def test_concurrent_requests_do_not_wait_for_each_other(sandbox: Sandbox) -> None:
    """A slow exec (a long stream) never holds up a stat on the same control connection."""
    _, conn = await sandbox.agent.stream("exec", argv=["sleep", "100"], env=[PATH_ENV])
    assert conn is not None
    results = await asyncio.gather(*(sandbox.agent.request("stat", path="/") for _ in range(20)))
    assert all(r["ok"] for r in results)
    conn.send_json({"signal": 9})
    await conn.collect()


async def test_ps_lists_the_main_process(supervisor_bin: Path, tmp_path: Path) -> None:
    secret = secrets.token_bytes(32)
    agent = await FakeAgent(tmp_path, secret).start()
    proc = start_supervisor(
        supervisor_bin, tmp_path, secret.hex(), tmp_path / "log", "sleep", "100"
    )
    try:
        ps = (await agent.request("ps"))["processes"]
        main = [p for p in ps if p["main"]]
        assert len(main) == 1 and main[0]["argv"] == ["sleep", "100"] and main[0]["running"]
        main_pid = main[0]["pid"]
        assert err(await agent.request("attach", pid=main_pid, stream="x"))["code"] == "EINVAL"
        proc.terminate()  # forwarded to the main process, whose status becomes ours
        assert proc.wait(timeout=BOUND) == 128 + signal.SIGTERM
    finally:
        stop(proc)
        await agent.stop()


async def test_processes_survive_an_agent_restart_and_the_channel_comes_back(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    reply, conn = await sandbox.agent.stream("exec", argv=["cat"], env=[PATH_ENV])
    assert conn is not None
    conn.send(DATA, b"before ")
    await conn.drain()
    await sandbox.agent.stop()  # the agent dies; the socket is gone

    restarted = await FakeAgent(sandbox.dir / "run", sandbox.secret).start()
    sandbox.agent = restarted  # the fixture stops this one
    await restarted.wait_control()
    ps = (await restarted.request("ps"))["processes"]
    assert [p["running"] for p in ps if p["pid"] == reply["pid"]] == [True]
    _, again = await restarted.stream("attach", pid=reply["pid"])
    assert again is not None
    again.send(DATA, b"after")
    again.send(EOF)
    out = await again.collect()
    assert out.stdout.endswith(b"after") and out.exit["code"] == 0


# -- files ------------------------------------------------------------------------------------


async def test_stat_reports_files_dirs_and_symlinks(sandbox: Sandbox, tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_bytes(b"12345")
    f.chmod(0o640)
    (tmp_path / "link").symlink_to("f.txt")
    e = (await sandbox.agent.request("stat", path=str(f)))["entry"]
    assert (e["name"], e["path"], e["type"], e["size"], e["mode"]) == (
        "f.txt",
        str(f),
        "file",
        5,
        0o640,
    )
    assert (e["uid"], e["gid"]) == (os.getuid(), os.getgid())
    assert abs(e["mtime"] - f.stat().st_mtime) < 1e-3
    link = (await sandbox.agent.request("stat", path=str(tmp_path / "link")))["entry"]
    assert (link["type"], link["target"]) == ("symlink", "f.txt")
    assert (await sandbox.agent.request("stat", path=str(tmp_path)))["entry"]["type"] == "dir"
    missing = err(await sandbox.agent.request("stat", path=str(tmp_path / "nope")))
    assert missing == {
        "code": "ENOENT",
        "message": f"stat {tmp_path / 'nope'}: No such file or directory",
        "path": str(tmp_path / "nope"),
    }
    assert err(await sandbox.agent.request("stat", path="relative"))["code"] == "EINVAL"
    assert err(await sandbox.agent.request("stat"))["code"] == "EINVAL"


async def test_list_with_depth_sorted_and_capped(sandbox: Sandbox, tmp_path: Path) -> None:
    d = tmp_path / "tree"
    (d / "b" / "c").mkdir(parents=True)
    (d / "a.txt").write_text("a")
    (d / "b" / "x").write_text("x")
    one = (await sandbox.agent.request("list", path=str(d)))["entries"]
    assert [e["path"] for e in one] == [str(d / "a.txt"), str(d / "b")]
    two = (await sandbox.agent.request("list", path=str(d), depth=2))["entries"]
    assert [e["path"] for e in two] == [str(d / p) for p in ("a.txt", "b", "b/c", "b/x")]
    assert err(await sandbox.agent.request("list", path=str(d / "a.txt")))["code"] == "ENOTDIR"
    assert err(await sandbox.agent.request("list", path=str(d), depth=0))["code"] == "EINVAL"
    big = tmp_path / "big"
    big.mkdir()
    for i in range(10_001):
        (big / str(i)).touch()
    capped = err(await sandbox.agent.request("list", path=str(big)))
    assert capped["code"] == "E2BIG" and str(big) in capped["message"]


async def test_mkdir_parents_mode_and_errors(sandbox: Sandbox, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    reply = await sandbox.agent.request("mkdir", path=str(target), mode=0o700)
    assert reply == {"id": reply["id"], "ok": True, "created": True}
    assert target.stat().st_mode & 0o7777 == 0o700
    assert (await sandbox.agent.request("mkdir", path=str(target)))["created"] is False
    (tmp_path / "file").touch()
    assert (
        err(await sandbox.agent.request("mkdir", path=str(tmp_path / "file")))["code"] == "EEXIST"
    )
    no_parent = await sandbox.agent.request("mkdir", path=str(tmp_path / "x" / "y"), parents=False)
    assert err(no_parent)["code"] == "ENOENT"
    mine = f"{os.getuid()}:{os.getgid()}"
    owned = tmp_path / "owned"
    assert (await sandbox.agent.request("mkdir", path=str(owned), user=mine))["created"]
    assert (owned.stat().st_uid, owned.stat().st_gid) == (os.getuid(), os.getgid())


async def test_move_remove_and_setattr(sandbox: Sandbox, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.txt", tmp_path / "dst.txt"
    src.write_text("data")
    moved = await sandbox.agent.request("move", src=str(src), dst=str(dst))
    assert moved["entry"]["path"] == str(dst) and dst.read_text() == "data" and not src.exists()
    assert err(await sandbox.agent.request("move", src=str(src), dst=str(dst)))["code"] == "ENOENT"

    attr = await sandbox.agent.request("setattr", path=str(dst), mode=0o600, mtime=1_000_000.25)
    assert (attr["entry"]["mode"], attr["entry"]["mtime"]) == (0o600, 1_000_000.25)
    assert dst.stat().st_mtime == 1_000_000.25

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").touch()
    assert (
        err(await sandbox.agent.request("remove", path=str(tree), recursive=False))["code"]
        == "ENOTEMPTY"
    )
    assert (await sandbox.agent.request("remove", path=str(tree)))["ok"]
    assert not tree.exists()
    assert err(await sandbox.agent.request("remove", path=str(tree)))["code"] == "ENOENT"


async def test_move_across_filesystems_copies(sandbox: Sandbox, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) next to the temp dir")
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("x")
    (src / "sub" / "f").chmod(0o751)
    os.utime(src / "sub" / "f", (1_000_000, 1_000_000))
    (src / "l").symlink_to("sub/f")
    dst = shm / f"fsb-move-{secrets.token_hex(4)}"
    try:
        reply = await sandbox.agent.request("move", src=str(src), dst=str(dst))
        assert reply["ok"], reply
        assert not src.exists()
        assert (dst / "sub" / "f").read_text() == "x"
        assert (dst / "sub" / "f").stat().st_mode & 0o7777 == 0o751
        assert (dst / "sub" / "f").stat().st_mtime == 1_000_000
        assert os.readlink(dst / "l") == "sub/f"
    finally:
        shutil.rmtree(dst, ignore_errors=True)


async def read_all(conn: Conn) -> bytes:
    data = b""
    while True:
        frame = await asyncio.wait_for(conn.read(), BOUND)
        assert frame is not None, "closed before EOF"
        if frame[0] == EOF:
            assert await asyncio.wait_for(conn.read(), BOUND) is None
            return data
        assert frame[0] == DATA
        data += frame[1]


async def test_read_streams_from_an_offset(sandbox: Sandbox, tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    content = os.urandom(300_000)  # several DATA frames
    f.write_bytes(content)
    reply, conn = await sandbox.agent.stream("read", path=str(f))
    assert reply["entry"]["size"] == len(content) and conn is not None
    assert await read_all(conn) == content
    _, conn = await sandbox.agent.stream("read", path=str(f), offset=299_990)
    assert conn is not None
    assert await read_all(conn) == content[299_990:]
    assert err((await sandbox.agent.stream("read", path=str(tmp_path)))[0])["code"] == "EISDIR"
    missing = err((await sandbox.agent.stream("read", path=str(tmp_path / "nope")))[0])
    assert missing["code"] == "ENOENT" and missing["message"].startswith(
        f"open {tmp_path / 'nope'}"
    )


async def write(sandbox: Sandbox, path: Path, chunks: list[bytes], **fields: Any) -> dict[str, Any]:
    reply, conn = await sandbox.agent.stream("write", path=str(path), **fields)
    if conn is None:
        return reply
    for c in chunks:
        conn.send(DATA, c)
    conn.send(EOF)
    answer = await conn.read_json()
    assert await asyncio.wait_for(conn.read(), BOUND) is None
    return answer


async def test_write_replaces_atomically_keeping_the_mode(sandbox: Sandbox, tmp_path: Path) -> None:
    f = tmp_path / "deep" / "er" / "f.txt"
    made = await write(sandbox, f, [b"hello ", b"world"], mtime=1_500_000_000.5)
    assert made["ok"] and made["entry"]["size"] == 11 and made["entry"]["mode"] == 0o644
    assert f.read_bytes() == b"hello world" and f.stat().st_mtime == 1_500_000_000.5
    f.chmod(0o751)
    kept = await write(sandbox, f, [b"v2"])
    assert kept["entry"]["mode"] == 0o751 and f.read_bytes() == b"v2"
    applied = await write(sandbox, f, [b"v3"], mode=0o600, user=f"{os.getuid()}:{os.getgid()}")
    assert applied["entry"]["mode"] == 0o600 and f.read_bytes() == b"v3"
    assert sorted(p.name for p in f.parent.iterdir()) == ["f.txt"]  # no temp files left
    assert err(await write(sandbox, tmp_path, [b"x"]))["code"] == "EISDIR"
    no_parents = await write(sandbox, tmp_path / "nope" / "f", [b"x"], parents=False)
    assert err(no_parents)["code"] == "ENOENT"


async def test_write_dropped_before_eof_leaves_the_old_file(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    d = tmp_path / "d"
    d.mkdir()
    f = d / "f.txt"
    f.write_bytes(b"old")
    reply, conn = await sandbox.agent.stream("write", path=str(f))
    assert reply["ok"] and conn is not None
    conn.send(DATA, b"half of the new")
    await conn.drain()
    conn.close()
    await wait_until(lambda: sorted(p.name for p in d.iterdir()) == ["f.txt"], "temp removed")
    assert f.read_bytes() == b"old"


async def test_watch_reports_changes_recursively(sandbox: Sandbox, tmp_path: Path) -> None:
    d = tmp_path / "w"
    (d / "sub").mkdir(parents=True)
    reply, conn = await sandbox.agent.stream("watch", path=str(d), recursive=True)
    assert reply["ok"] and conn is not None
    (d / "a.txt").write_text("x")
    (d / "sub" / "b.txt").touch()
    (d / "a.txt").chmod(0o600)
    (d / "a.txt").rename(d / "c.txt")
    (d / "c.txt").unlink()
    (d / "new").mkdir()
    want = [
        ("create", d / "a.txt"),
        ("write", d / "a.txt"),
        ("create", d / "sub" / "b.txt"),
        ("chmod", d / "a.txt"),
        ("rename", d / "a.txt"),
        ("rename", d / "c.txt"),
        ("remove", d / "c.txt"),
        ("create", d / "new"),
    ]
    seen: list[tuple[str, Path]] = []
    while not all(w in seen for w in want):
        event = await conn.read_json()
        seen.append((event["event"], Path(event["path"])))
        if event["path"] == str(d / "new"):
            assert event["type"] == "dir"
    (d / "new" / "n.txt").touch()  # a directory made after the watch began is watched too
    while (event := await conn.read_json())["path"] != str(d / "new" / "n.txt"):
        pass
    assert event["event"] == "create" and event["type"] == "file"
    conn.close()
    missing = err((await sandbox.agent.stream("watch", path=str(tmp_path / "nope")))[0])
    assert missing["code"] == "ENOENT"


async def test_idle_supervisor_exits_zero_on_sigterm(sandbox: Sandbox) -> None:
    await sandbox.agent.wait_control()
    reply, conn = await sandbox.agent.stream("exec", argv=["sleep", "100"], env=[PATH_ENV])
    assert conn is not None
    sandbox.proc.terminate()
    assert sandbox.proc.wait(timeout=BOUND) == 0
    # Not PID 1, it still kills what it started (as PID 1 the namespace would).
    await wait_until(
        lambda: (
            not Path(f"/proc/{reply['pid']}").exists()
            or "Z" in Path(f"/proc/{reply['pid']}/stat").read_text().split()[2]
        ),
        "sleep killed",
    )


def test_json_frame_constant_matches_protocol() -> None:
    assert (JSON, DATA, STDOUT, EOF) == (1, 2, 3, 5)
