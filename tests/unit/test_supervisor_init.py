"""fsb-supervisor as init (reap, forward signals, exit with the main status), run directly on the
host (no container needed, no channel: FSB_CHANNEL unset).

It is not PID 1 here, so it relies on PR_SET_CHILD_SUBREAPER to adopt orphans; that makes the
reaping test meaningful: an orphan is re-parented to init, not to the host's init.
Timeouts below only bound a failing test; nothing asserts how fast anything is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-native"
BOUND = 10.0  # seconds before a hung wait counts as a failure
ORPHANS = 8


@pytest.fixture(scope="module")
def init_bin() -> Path:
    """Built from the working tree (scripts/build-native is a no-op when nothing changed)."""
    if shutil.which("cargo") is None and not (Path.home() / ".cargo" / "bin" / "cargo").exists():
        pytest.skip("no cargo to build native/supervisor (scripts/setup installs one)")
    result = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return REPO / "native" / "bin" / "fsb-supervisor"


@pytest.fixture
def spawn(init_bin: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `fsb-supervisor -- argv...`; every init still running at teardown is killed."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, **kw: object) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            [str(init_bin), "--", *argv], **kw
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def proc_status(pid: int) -> dict[str, str]:
    """Fields of /proc/PID/status; empty once the process is fully gone (reaped)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone between open and read
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def zombie_children(ppid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = proc_status(int(entry.name))
            if st.get("PPid", "").strip() == str(ppid) and st.get("State", "").startswith("Z"):
                found.append(int(entry.name))
    return found


def run_init(init_bin: Path, *argv: str, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [str(init_bin), *argv], capture_output=True, check=False, timeout=BOUND, **kw
    )


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_code_propagates(init_bin: Path, code: int) -> None:
    assert run_init(init_bin, "--", "sh", "-c", f"exit {code}").returncode == code


def test_killed_child_maps_to_128_plus_signal(init_bin: Path) -> None:
    assert run_init(init_bin, "--", "sh", "-c", "kill -KILL $$").returncode == 128 + 9


@pytest.mark.parametrize("sig", ["TERM", "INT", "HUP", "QUIT", "USR1", "USR2", "WINCH"])
def test_signal_is_forwarded_to_the_child(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path, sig: str
) -> None:
    got, ready = tmp_path / "got", tmp_path / "ready"
    script = (
        f"trap 'echo {sig} > {got}; kill $pid; exit 0' {sig}; "
        f"sleep 100 & pid=$!; echo > {ready}; wait"
    )
    proc = spawn("sh", "-c", script)
    wait_for(ready.exists, "the child to install its trap")
    proc.send_signal(getattr(signal, f"SIG{sig}"))
    assert proc.wait(timeout=BOUND) == 0
    assert got.read_text().strip() == sig


def test_default_term_action_kills_the_child(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """The point of the helper: `sleep` as a sandbox's command stops on delete's SIGTERM."""
    ready = tmp_path / "ready"
    proc = spawn("sh", "-c", f"echo > {ready}; exec sleep 100")
    wait_for(ready.exists, "the child to start")
    proc.terminate()
    assert proc.wait(timeout=BOUND) == 128 + signal.SIGTERM


def test_orphans_are_adopted_and_reaped(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    go = tmp_path / "go"
    # Double forks: each middle process exits at once, so its child is orphaned and must be
    # re-parented to init. Several orphans exit at once so their SIGCHLDs coalesce, which only
    # a reap-everything loop handles.
    script = f"""
import os, time
for i in range({ORPHANS}):
    if os.fork() == 0:
        if os.fork() == 0:
            with open(os.path.join({str(tmp_path)!r}, f"{{i}}.pid"), "w") as f:
                f.write(str(os.getpid()))
            while not os.path.exists({str(go)!r}):
                time.sleep(0.02)
        os._exit(0)
    os.wait()
time.sleep(100)
"""
    proc = spawn(sys.executable, "-c", script)
    pidfiles = [tmp_path / f"{i}.pid" for i in range(ORPHANS)]
    wait_for(lambda: all(p.exists() and p.read_text() for p in pidfiles), "the orphans' pids")
    orphans = [int(p.read_text()) for p in pidfiles]
    wait_for(
        lambda: all(proc_status(o).get("PPid", "").strip() == str(proc.pid) for o in orphans),
        "the orphans to be re-parented to the supervisor",
    )
    # Stopped, init cannot take the SIGCHLDs as they come, so they merge into one pending signal.
    os.kill(proc.pid, signal.SIGSTOP)
    wait_for(lambda: proc_status(proc.pid)["State"].startswith("T"), "the supervisor to stop")
    go.touch()
    wait_for(
        lambda: all(proc_status(o).get("State", "").startswith("Z") for o in orphans),
        "the orphans to exit",
    )
    os.kill(proc.pid, signal.SIGCONT)
    wait_for(
        lambda: all(proc_status(o) == {} for o in orphans), "the supervisor to reap the orphans"
    )
    assert zombie_children(proc.pid) == []
    assert proc.poll() is None  # an orphan's exit is not the main child's
    proc.terminate()
    assert proc.wait(timeout=BOUND) == 128 + signal.SIGTERM


def test_child_leads_its_own_process_group(init_bin: Path) -> None:
    """So a job-wide signal (kill -- -PGID) reaches the command's whole job, never init."""
    code = "import os; print(os.getpgid(0) == os.getpid(), os.getpgid(0) != os.getppid())"
    result = run_init(init_bin, "--", sys.executable, "-c", code, stdin=subprocess.DEVNULL)
    assert result.stdout.split() == [b"True", b"True"]


def test_exits_with_main_child_while_grandchildren_linger(
    spawn: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    pidfile = tmp_path / "lingerer.pid"
    proc = spawn("sh", "-c", f"sleep 100 & echo $! > {pidfile}; exit 4")
    try:
        assert proc.wait(timeout=BOUND) == 4
    finally:
        # Outside a PID namespace nothing kills the lingerer for us.
        if pidfile.exists() and pidfile.read_text().strip():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_exec_failure_names_the_command(init_bin: Path, tmp_path: Path) -> None:
    missing = run_init(init_bin, "--", "no-such-command-fsb")
    assert missing.returncode == 127
    assert b"fsb-supervisor: exec no-such-command-fsb: No such file or directory" in missing.stderr

    not_executable = tmp_path / "data.txt"
    not_executable.write_text("x")
    denied = run_init(init_bin, "--", str(not_executable))
    assert denied.returncode == 126
    assert f"fsb-supervisor: exec {not_executable}: Permission denied".encode() in denied.stderr


def test_usage_error_for_an_unknown_option(init_bin: Path) -> None:
    for argv in (["--bogus", "x"], ["--warm", "x"]):
        result = run_init(init_bin, *argv)
        assert result.returncode == 2
        assert b"usage: fsb-supervisor [--] [COMMAND" in result.stderr
    # Warm mode waits for the agent's start_main: without a channel there is no agent.
    result = run_init(init_bin, "--warm")
    assert result.returncode == 2
    assert b"--warm needs FSB_CHANNEL" in result.stderr


def _takes(pid: int, sig: int) -> bool:
    """`pid` will take `sig` rather than die of its default action: a handler catches it
    (SigCgt), it is blocked (SigBlk: it stays pending until read), or the process waits for
    it in sigwaitinfo (the supervisor's way: while waiting, the kernel shows the waited-for
    signals unblocked, so neither mask shows it then; wchan does)."""
    masks = 0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("SigCgt:", "SigBlk:")):
                    masks |= int(line.split()[1], 16)
        with open(f"/proc/{pid}/wchan") as wchan:
            waiting = "sigtimedwait" in wchan.read()
    except OSError:
        return False
    return bool(masks >> (sig - 1) & 1) or waiting


@pytest.mark.parametrize("argv", [[], ["--"]])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_without_a_command_it_idles_until_sigterm_or_sigint(
    init_bin: Path, argv: list[str], sig: int
) -> None:
    proc = subprocess.Popen([str(init_bin), *argv], stderr=subprocess.PIPE)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)  # still up: idle (a bound on a failure, not a speed claim)
        # Signal only once it takes the signal: earlier, under load, the default action would
        # kill it before it blocks signals, which is not what is tested.
        deadline = time.monotonic() + BOUND
        while not _takes(proc.pid, sig) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(sig)
        assert proc.wait(timeout=BOUND) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_argv_passes_through_unchanged(init_bin: Path) -> None:
    args = ["a b", "", "*", "--", "-x", "$HOME", "ünï"]
    result = run_init(init_bin, "--", "printf", r"%s\0", *args)
    assert result.returncode == 0
    assert result.stdout.split(b"\0")[:-1] == [a.encode() for a in args]


def test_env_passes_through_unchanged_and_path_is_searched(init_bin: Path) -> None:
    env_dir = os.path.dirname(shutil.which("env") or "/usr/bin/env")
    env = {"PATH": env_dir, "V": "with space", "EMPTY": "", "MULTI": "a\nb"}
    result = run_init(init_bin, "--", "env", "-0", env=env)
    assert result.returncode == 0
    pairs = [p.decode().split("=", 1) for p in result.stdout.split(b"\0")[:-1]]
    assert dict(pairs) == env


def test_fsb_variables_are_scrubbed_from_the_main_environment(init_bin: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FSB_SANDBOX_ID": "x", "KEEP": "1"}
    result = run_init(init_bin, "--", "env", env=env)
    lines = result.stdout.decode().splitlines()
    assert "KEEP=1" in lines and not [x for x in lines if x.startswith("FSB_")]


@pytest.mark.skipif(os.geteuid() != 0, reason="reading a non-dumpable process's environ needs root")
def test_the_secret_is_wiped_from_the_environment_block(init_bin: Path) -> None:
    """/proc/PID/environ shows the original block, which unsetenv does not change."""
    secret = "ab" * 32
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FSB_SUPERVISOR_SECRET": secret}
    proc = subprocess.Popen([str(init_bin), "--", "sleep", "100"], env=env)
    try:
        wait_for(lambda: any(True for _ in children(proc.pid)), "the main process to start")
        block = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert b"FSB_SUPERVISOR_SECRET=" in block  # the name stays; only the value is wiped
        assert secret.encode() not in block
    finally:
        proc.terminate()
        proc.wait(timeout=BOUND)


def test_supervisor_is_not_dumpable_but_its_children_are(init_bin: Path) -> None:
    """PR_SET_DUMPABLE 0: a process of the same uid (sandbox code) cannot read the supervisor's
    /proc/PID/environ (where FSB_SUPERVISOR_SECRET was); its children are ordinary processes."""
    as_nobody: list[str] = []
    if os.geteuid() == 0:  # root reads everything: run both sides as one unprivileged uid
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop root for this test")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    proc = subprocess.Popen([*as_nobody, str(init_bin), "--", "sleep", "100"])
    try:
        wait_for(lambda: any(True for _ in children(proc.pid)), "the main process to start")
        child = next(children(proc.pid))

        def readable(pid: int) -> bool:
            cmd = [*as_nobody, "cat", f"/proc/{pid}/environ"]
            return (
                subprocess.run(cmd, capture_output=True, check=False, timeout=BOUND).returncode == 0
            )

        assert readable(child)  # the check works: same uid, dumpable
        assert not readable(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=BOUND)


def children(ppid: int) -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and proc_status(int(entry.name)).get("PPid", "").strip() == str(
            ppid
        ):
            yield int(entry.name)
