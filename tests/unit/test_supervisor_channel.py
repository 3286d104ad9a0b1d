# ruff: noqa: F811  (pytest fixtures imported from supervisor_fixtures are parameters here)
"""fsb-supervisor's channel and processes, black box: the real binary as a plain child process
(not PID 1, no root needed) dials a fake agent (tests/unit/supervisor_agent.py) listening in a
temp dir. File operations: test_supervisor_files.py.

Timeouts only bound a failing test; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import time
from pathlib import Path

import pytest

from tests.unit.supervisor_agent import BOUND, DATA, EOF, JSON, STDOUT, FakeAgent
from tests.unit.supervisor_fixtures import (  # noqa: F401 (fixtures)
    PATH_ENV,
    SANDBOX_ID,
    Sandbox,
    err,
    sandbox,
    start_supervisor,
    stop,
    supervisor_bin,
    wait_until,
)

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


async def test_a_background_child_holding_the_pipe_does_not_hold_the_exit_back(
    sandbox: Sandbox,
) -> None:
    out = await sandbox.agent.run(["sh", "-c", "sleep 100 & echo $!"])
    try:
        assert out.exit["code"] == 0
    finally:
        os.kill(int(out.stdout), signal.SIGKILL)


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
    not_dir = await sandbox.agent.request("exec", stream="t6", argv=["true"], cwd=str(data))
    assert err(not_dir)["code"] == "ENOTDIR" and str(data) in err(not_dir)["message"]
    user = await sandbox.agent.request("exec", stream="t4", argv=["true"], user="nobody-fsb")
    assert err(user) == {
        "code": "EINVAL",
        "message": 'unknown user "nobody-fsb" (not in /etc/passwd)',
    }
    empty = await sandbox.agent.request("exec", stream="t5", argv=[])
    assert err(empty)["code"] == "EINVAL" and "argv" in err(empty)["message"]
    unknown = await sandbox.agent.request("start_mains", argv=["true"])
    assert err(unknown)["code"] == "EINVAL" and "unknown op" in err(unknown)["message"]
    # start_main is for a --warm supervisor only; this one is idle, not waiting for one.
    not_warm = await sandbox.agent.request("start_main", argv=["true"])
    assert err(not_warm)["code"] == "EINVAL" and "--warm" in err(not_warm)["message"]


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

    # The same through the control connection (no data connection needed).
    reply2, conn2 = await sandbox.agent.stream(
        "exec", argv=["sh", "-c", "read x; stty size"], env=[PATH_ENV], pty={"cols": 10, "rows": 5}
    )
    assert conn2 is not None
    resized = await sandbox.agent.request("resize", pid=reply2["pid"], cols=77, rows=33)
    assert resized["ok"], resized
    conn2.send(DATA, b"\n")
    assert b"33 77" in (await conn2.collect()).stdout
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


# -- parked data connections, descriptors per exec ---------------------------------------------


async def test_a_parked_data_connection_carries_the_next_stream(sandbox: Sandbox) -> None:
    agent = sandbox.agent
    token = secrets.token_hex(16)
    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    agent._streams[token] = fut  # type: ignore[assignment]
    assert (await agent.request("park", stream=token))["ok"] is True
    # Answered only once parked: the connection is here already, handshaken like any other.
    assert fut.done()
    conn = fut.result()
    parked_hellos = len(agent.hellos)
    reply = await agent.request(
        "exec", stream=token, argv=["sh", "-c", "echo parked"], env=[PATH_ENV], stdin=False
    )
    assert reply["ok"] is True and reply["parked"] is True
    out = await conn.collect()  # type: ignore[attr-defined]
    assert (out.stdout, out.exit["code"]) == (b"parked\n", 0)
    assert len(agent.hellos) == parked_hellos  # no dial for the stream itself
    # A token used once is gone: a stream naming it again gets a dial, which the agent refuses.
    again = await agent.request("exec", stream=token, argv=["true"], env=[PATH_ENV])
    assert again["ok"] is True and "parked" not in again
    await wait_until(lambda: agent.refused == 1, "the refused redial of a used token")


async def test_park_is_bounded_and_refuses_a_bad_token(sandbox: Sandbox) -> None:
    agent = sandbox.agent
    assert err(await agent.request("park", stream=""))["code"] == "EINVAL"
    for i in range(8):
        token = secrets.token_hex(16)
        agent._streams[token] = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
        assert (await agent.request("park", stream=token))["ok"] is True, i
    token = secrets.token_hex(16)
    agent._streams[token] = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
    assert err(await agent.request("park", stream=token))["code"] == "EBUSY"


async def test_execs_do_not_keep_descriptors_after_they_end(sandbox: Sandbox) -> None:
    # An exited process's status is kept for minutes; its eventfd, stdin pipe and socket
    # duplicate must not be, or a few hundred execs exhaust the sandbox's RLIMIT_NOFILE.
    fds = Path(f"/proc/{sandbox.proc.pid}/fd")
    await sandbox.agent.run(["true"])
    before = len(list(fds.iterdir()))
    for _ in range(40):
        await sandbox.agent.run(["true"], stdin=True)
    await wait_until(lambda: len(list(fds.iterdir())) <= before + 4, "descriptors released")
