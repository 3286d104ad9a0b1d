"""A real `fsb server` process for end-to-end tests, and the cleanup that leaves nothing behind.

The server runs exactly as a user runs it (`fsb server --data-dir ...`), starting its own
containerd under the data dir. Teardown removes every container, task and snapshot of that
containerd, stops the server (which stops its agents and containerd), deletes the agents' network
namespaces and the data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastsandbox.fleet.local import purge as purge_agents

VENV_BIN = Path(sys.executable).parent
FSB = str(VENV_BIN / "fsb")
CONTAINERD_NS = "fastsandbox"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerSurface:
    """What tests use of a running server of either shape: the CLI with its environment, and
    the containerd it drives (`Server` here, `KubeServer` in tests/e2e/_kube_server.py)."""

    containerd_namespace = CONTAINERD_NS
    # Added to every `fsb pool create` of the shared acceptance tests: private networks exist
    # only in the embedded shape so far (a Kubernetes agent refuses them, failing closed).
    pool_args: tuple[str, ...] = ()
    env: dict[str, str]
    containerd_socket: Path

    def fsb(
        self, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`fsb ARGS` with this server's environment (`env` adds to / overrides it)."""
        return subprocess.run(
            [FSB, *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=timeout,
        )

    def fsb_json(self, *args: str) -> dict:  # type: ignore[type-arg]
        result = self.fsb(*args, "-o", "json")
        assert result.returncode == 0, result.stderr
        data: dict = json.loads(result.stdout)  # type: ignore[type-arg]
        return data

    def ctr(self, *args: str) -> str:
        return subprocess.run(
            [
                "ctr",
                "--timeout",
                "5s",
                "-a",
                str(self.containerd_socket),
                "-n",
                self.containerd_namespace,
                *args,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout

    def containers(self) -> set[str]:
        return set(self.ctr("containers", "ls", "-q").split())

    def snapshots(self) -> set[str]:
        lines = self.ctr("snapshots", "ls").splitlines()[1:]
        return {line.split()[0] for line in lines if line.strip()}

    def running_tasks(self) -> set[str]:
        rows = [line.split() for line in self.ctr("tasks", "ls").splitlines()[1:]]
        return {row[0] for row in rows if len(row) >= 3 and row[2] == "RUNNING"}


@dataclass
class Server(ServerSurface):
    data_dir: Path
    endpoint: str
    registry: str
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            FSB_ENDPOINT=self.endpoint,
            FSB_DATA_DIR=str(self.data_dir),
            FSB_NAMESPACE="default",
        )
        env.pop("FSB_TOKEN", None)
        return env

    @property
    def containerd_socket(self) -> Path:
        return self.data_dir / "containerd" / "ctd.sock"

    @property
    def ca_file(self) -> Path:
        """The CA the server made in its data dir (clients with FSB_DATA_DIR find it alone)."""
        return self.data_dir / "tls" / "ca.crt"

    @property
    def token(self) -> str:
        """The admin token (the server's own, in its data dir)."""
        return (self.data_dir / "token").read_text().strip()

    def start(self, timeout: float = 90.0) -> None:
        self._close_pipe()
        argv = [
            FSB,
            "server",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            self.endpoint,
            "--insecure-registry",
            self.registry,
            "--log-format",
            "json",
            "--log-file",
            str(self.data_dir / "server.log"),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fsb server exited {self.proc.returncode}: {self._log_tail()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                self.output.append(line)
                if "ready" in line:
                    return
        raise RuntimeError(f"fsb server not ready in {timeout}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        log = self.data_dir / "server.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else "".join(self.output)

    def _close_pipe(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is not None:
                return self.proc.returncode
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        finally:
            self._close_pipe()


def new_server(registry: str, *extra_args: str) -> Server:
    # Short path: unix sockets live under it (108-byte limit).
    data_dir = Path(tempfile.mkdtemp(prefix="fsb-e2e-", dir="/tmp"))
    return Server(
        data_dir=data_dir,
        endpoint=f"127.0.0.1:{free_port()}",
        registry=registry,
        extra_args=list(extra_args),
    )


def purge(server: Server) -> None:
    """Remove everything the server made: containers, agents, netns, containerd, data dir.

    Containers are removed through containerd (killing shims alone would orphan the sandbox
    processes); if the server's containerd is not running any more, it is started again from its
    config just for this.
    """
    helper = _containerd_for_cleanup(server)
    try:
        if _answers(server):
            _remove_all_containers(server)
    finally:
        server.stop()
        if helper is not None:
            helper.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(10)
    asyncio.run(purge_agents(server.data_dir))
    _kill_processes_mentioning(str(server.data_dir))
    _unmount_under(server.data_dir)
    shutil.rmtree(server.data_dir, ignore_errors=True)


def _answers(server: Server) -> bool:
    try:
        server.ctr("version")
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def _containerd_for_cleanup(server: Server) -> subprocess.Popen[bytes] | None:
    config = server.data_dir / "containerd" / "config.toml"
    if not config.exists() or _answers(server):
        return None
    proc = subprocess.Popen(
        ["containerd", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _answers(server):
        time.sleep(0.1)
    return proc


def _remove_all_containers(server: Server) -> None:
    def ctr(*argv: str) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            server.ctr(*argv)

    for cid in server.containers():
        ctr("tasks", "kill", "-a", "-s", "KILL", cid)
    for cid in server.containers():
        for _ in range(50):
            ctr("tasks", "delete", "-f", cid)
            if cid not in _task_ids(server):
                break
            time.sleep(0.1)
        ctr("containers", "delete", cid)
    for key in server.snapshots():
        ctr("snapshots", "rm", key)


def _task_ids(server: Server) -> set[str]:
    try:
        rows = server.ctr("tasks", "ls", "-q").split()
    except (subprocess.SubprocessError, OSError):
        return set()
    return set(rows)


def _kill_processes_mentioning(needle: str) -> None:
    """SIGKILL every process whose command line names `needle` (a data dir), or that runs in a
    cgroup of one of its agents (`/fastsandbox/<agent>/<container>`): a sandbox's processes
    (PID 1 `/.fsb/init` and what it runs), which containerd did not get to kill (its calls
    time out under a heavy load), would otherwise outlive their shims and keep their rootfs and
    disk layer (a loop device) alive."""
    agents_dir = Path(needle) / "agents"
    agents = {d.name for d in agents_dir.iterdir()} if agents_dir.is_dir() else set()
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            groups = {
                part
                for line in (proc / "cgroup").read_text().splitlines()
                for part in line.rpartition(":")[2].split("/")
            }
            if needle in cmdline or groups & agents:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)


def _unmount_under(root: Path) -> None:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    targets = [m.split()[1] for m in mounts if m.split()[1].startswith(str(root))]
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)
