"""The embedded fleet: each agent is a local `python -m fastsandbox.agent` process.

Each agent gets a network namespace of its own (`netns.py`: CNI bridge, one IP per agent) that its
sandboxes join, or, where CNI is unavailable, the host network (every agent at 127.0.0.1, so two
agents' sandboxes can clash on a port: the documented fallback, not the normal mode).

Why the agent process itself stays in the host network namespace and only its sandboxes join
the agent's namespace (`--netns-path`): the agent serves on a unix socket and talks to containerd
over one, so it needs nothing from that namespace, while its image pulls need the host's network:
inside the namespace `127.0.0.1` would be the namespace's own loopback, and the loopback
registry setup makes for the demo image would be unreachable. This also keeps spawning a plain
fork+exec, with no `ip netns exec` hop or `setns` in a pre-exec hook.

Lifecycle:
- Agents run in a session of their own, so a Ctrl-C aimed at the server does not reach them; the
  server stops them on `close()`. Their sandboxes belong to containerd's shims and never stop
  with an agent.
- `<data-dir>/agents/<name>/agent.json` records each agent (pool, IP, namespace, pid, ...). A
  restarted server adopts the agents still running (pid alive and its command line names this
  agent's state dir) and restarts the others with the same name, namespace and IP.
- One guarded supervisor task learns of exits through pidfds (no polling) and restarts a crashed
  agent with backoff (0.2 s doubling to 5 s, reset after a healthy run).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fastsandbox._aio.tasks import TaskSet, guarded
from fastsandbox.agent.args import AgentArgs, flag_of
from fastsandbox.agent.network import plan as netplan
from fastsandbox.api.models import SandboxPool
from fastsandbox.errors import InvalidArgument, Unavailable
from fastsandbox.fleet import hostnet, netns
from fastsandbox.fleet.base import AgentHandle
from fastsandbox.fleet.netns import CniNetwork
from fastsandbox.fleet.warm_limits import DEFAULT_CPU, DEFAULT_MEMORY, warm_limit_args
from fastsandbox.settings import DELETE_GRACE_SECONDS, LogSettings

log = logging.getLogger(__name__)

STATE_FILE = "agent.json"
CGROUP_PARENT = "/fastsandbox"
# Longest path a unix socket address can hold (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107
SHORT_SOCKET_DIR = Path("/run/fastsandbox/sockets")
FIRST_BACKOFF = 0.2
MAX_BACKOFF = 5.0
# An agent that ran this long before exiting counts as healthy: its next crash starts over.
HEALTHY_RUN_SECONDS = 10.0
STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class AgentState:
    """What `agent.json` holds: enough to adopt or restart the agent identically."""

    name: str
    pool: str
    namespace: str
    ip: str
    network: str
    """cni | host."""
    netns: str
    """Namespace name ("" on the host network); its path is /var/run/netns/<netns>."""
    socket: str
    runtime: str
    capacity: int
    version: str = ""
    pid: int = 0
    # The pool's warm slots when the agent was started (its prewarmImages are the hot ones).
    warm_slots: int = 0
    warm_images: tuple[str, ...] = ()
    # A gVisor pool's default limits, its pinned slots' (fleet/warm_limits.py); else empty.
    warm_limits: dict[str, int] = field(default_factory=dict)
    network_mode: str = "shared"
    """The pool's networkMode when the agent was made (state files before it: shared)."""
    egress: str = "none"
    egress_allow: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # JSON gives a list back.
        object.__setattr__(self, "egress_allow", tuple(self.egress_allow))
        object.__setattr__(self, "warm_images", tuple(self.warm_images))

    @property
    def target(self) -> str:
        return f"unix://{self.socket}"

    def handle(self) -> AgentHandle:
        return AgentHandle(
            name=self.name,
            pool=self.pool,
            namespace=self.namespace,
            target=self.target,
            ip=self.ip,
            version=self.version,
        )


@dataclass(slots=True)
class _Agent:
    state: AgentState
    state_dir: Path
    popen: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    started_at: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class LocalFleet:
    def __init__(
        self,
        *,
        data_dir: Path,
        containerd_socket: Path,
        network: str = "cni",
        insecure_registries: Sequence[str] = (),
        grace_seconds: float = DELETE_GRACE_SECONDS,
        log: LogSettings | None = None,
        cni: CniNetwork | None = None,
        default_cpu: str = DEFAULT_CPU,
        default_memory: str = DEFAULT_MEMORY,
        containerd_namespace: str = "fastsandbox",
        cgroup_parent: str = CGROUP_PARENT,
        agent_argv: Sequence[str] = (sys.executable, "-m", "fastsandbox.agent"),
    ) -> None:
        if network not in {"auto", "cni", "host"}:
            raise InvalidArgument("network must be cni or host")
        # `auto` used to fall back to the host network when CNI was missing; it now means cni:
        # host networking only when an administrator asks for it.
        network = "cni" if network == "auto" else network
        # Absolute: adoption compares the `--state-dir` in a running agent's command line.
        self.data_dir = data_dir.resolve()
        self.agents_dir = self.data_dir / "agents"
        self.containerd_socket = containerd_socket
        self.containerd_namespace = containerd_namespace
        self.cgroup_parent = cgroup_parent
        self.network = network
        self.cni = cni or CniNetwork()
        self.insecure_registries = list(insecure_registries)
        self.grace_seconds = grace_seconds
        self.log_settings = log or LogSettings()
        self.default_limits = (default_cpu, default_memory)
        self.agent_argv = list(agent_argv)
        self._agents: dict[str, _Agent] = {}
        self._tasks = TaskSet()
        self._wake = asyncio.Event()
        self._supervising = False
        self._closed = False

    # -- AgentFleet --------------------------------------------------------------------------
    async def start(self) -> list[AgentHandle]:
        self._supervise_once()
        for path in sorted(self.agents_dir.glob(f"*/{STATE_FILE}")):
            try:
                state = AgentState(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                log.error(
                    "unreadable agent state; ignoring", extra={"path": str(path), "err": str(exc)}
                )
                continue
            if state.name in self._agents:
                continue
            agent = _Agent(state=state, state_dir=path.parent)
            self._agents[state.name] = agent
            async with agent.lock:
                if self._adopt(agent):
                    log.info("adopted running agent", extra={"agent": state.name, "pid": state.pid})
                else:
                    log.info("restarting agent", extra={"agent": state.name, "ip": state.ip})
                    try:
                        await self._launch(agent)
                    except Exception:
                        # The supervisor keeps trying; the control plane sees it unready meanwhile.
                        log.exception("agent restart failed", extra={"agent": state.name})
                        agent.exited.set()
                        self._wake.set()
        return [a.state.handle() for a in self._agents.values()]

    async def start_agent(self, pool: SandboxPool, name: str) -> AgentHandle:
        self._supervise_once()
        existing = self._agents.get(name)
        if existing is not None:
            async with existing.lock:  # a concurrent start of the same name: share its outcome
                if self._agents.get(name) is not existing:
                    raise Unavailable(f"agent {name} failed to start; see its agent.log")
                return existing.state.handle()
        state_dir = self.agents_dir / name
        state = AgentState(
            name=name,
            pool=pool.metadata.name,
            namespace=pool.metadata.namespace,
            ip="127.0.0.1",
            network="host",
            netns="",
            socket=self._socket_path(state_dir),
            runtime=str(pool.spec.runtime),
            capacity=pool.spec.max_sandboxes_per_agent,
            version=pool.spec.agent_version,
            warm_slots=pool.spec.warm_slots,
            warm_images=tuple(pool.spec.prewarm_images),
            warm_limits=warm_limit_args(pool, *self.default_limits),
            network_mode=pool.spec.network_mode.value,
            egress=pool.spec.egress.value,
            egress_allow=tuple(pool.spec.egress_allow),
        )
        agent = _Agent(state=state, state_dir=state_dir)
        self._agents[name] = agent
        async with agent.lock:
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
                os.chmod(state_dir, 0o700)
                if self._use_cni():
                    agent.state = replace(state, network="cni", netns=netns.NETNS_PREFIX + name)
                await self._launch(agent)
            except BaseException:
                del self._agents[name]
                # Nothing runs in a namespace we just made: leave no trace of the attempt.
                if agent.state.netns and agent.state.pid == 0:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(netns.remove(agent.state.netns, self.cni))
                if agent.state.pid == 0:
                    shutil.rmtree(state_dir, ignore_errors=True)
                raise
        log.info(
            "agent started",
            extra={"agent": name, "pool": state.pool, "ip": agent.state.ip, "pid": agent.state.pid},
        )
        return agent.state.handle()

    async def stop_agent(self, name: str) -> None:
        agent = self._agents.get(name)
        if agent is None:
            # Unknown to us: still clear anything a previous run left under this name.
            path = self.agents_dir / name / STATE_FILE
            if not path.exists():
                return
            agent = _Agent(state=AgentState(**json.loads(path.read_text())), state_dir=path.parent)
            self._adopt(agent)
        agent.stopping = True
        async with agent.lock:
            await self._terminate(agent)
            await _remove_sandbox_netns(agent.state)
            if agent.state.egress == "allow" and agent.state.netns:
                await hostnet.remove_guard(agent.state.ip)
            if agent.state.netns:
                await netns.remove(agent.state.netns, self.cni)
            shutil.rmtree(agent.state_dir, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(agent.state.socket)
        self._agents.pop(name, None)
        log.info("agent stopped and removed", extra={"agent": name})

    async def agents(self) -> list[AgentHandle]:
        return [a.state.handle() for a in self._agents.values()]

    async def close(self) -> None:
        """Stop supervising, then stop every agent; namespaces and state stay for the next
        start (the sandboxes in those namespaces keep running)."""
        self._closed = True
        await self._tasks.close()
        for agent in self._agents.values():
            agent.stopping = True
        await asyncio.gather(*(self._terminate(a) for a in self._agents.values()))
        self._agents.clear()

    # -- processes ---------------------------------------------------------------------------
    def _use_cni(self) -> bool:
        if self.network == "host":
            return False
        reason = self.cni.unavailable_reason()
        if reason is not None:
            # Fail closed: no silent fallback to the host network.
            raise Unavailable(
                f"cannot give agents a network namespace: {reason}; install the CNI plugins "
                "(containernetworking-plugins) and run as root, or start the server with "
                "--network host (sandboxes then share the host network)"
            )
        return True

    def _socket_path(self, state_dir: Path) -> str:
        path = str(state_dir / "agent.sock")
        if len(path.encode()) <= MAX_SOCKET_PATH:
            return path
        # A deep data dir: keep the socket short, unique per state dir (made by `_launch`).
        digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:20]
        return str(SHORT_SOCKET_DIR / f"{digest}.sock")

    async def _launch(self, agent: _Agent) -> None:
        """(Re)make the agent's namespace if needed, spawn the process, record it."""
        state = agent.state
        if state.network == "cni":
            # Fail closed: an agent whose namespace cannot be made does not start (no fallback
            # to the host network; an exhausted subnet is such a failure too).
            ip = await netns.ensure(
                state.netns, self.cni, want_ip=state.ip if state.ip != "127.0.0.1" else None
            )
            state = replace(state, ip=ip)
            if state.network_mode == "private" and state.egress == "allow":
                await hostnet.ensure_egress(self.cni, state.netns, ip)
        agent.state_dir.mkdir(parents=True, exist_ok=True)
        Path(state.socket).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state.socket)  # a dead agent's socket file would refuse the new bind
        argv = self._argv(state, agent.state_dir)
        popen = _spawn(argv, agent.state_dir / "agent.log")
        agent.popen = popen
        agent.state = replace(state, pid=popen.pid)
        agent.started_at = time.monotonic()
        agent.restart_at = None
        self._watch(agent, popen.pid)
        self._save(agent)

    def _argv(self, state: AgentState, state_dir: Path) -> list[str]:
        args = AgentArgs(
            name=state.name,
            pool=state.pool,
            namespace=state.namespace,
            listen=state.target,
            state_dir=state_dir,
            containerd_socket=self.containerd_socket,
            containerd_namespace=self.containerd_namespace,
            capacity=state.capacity,
            runtime=state.runtime,
            agent_ip=state.ip,
            netns_path=netns.netns_path(state.netns) if state.netns else None,
            network_mode=state.network_mode,
            egress=state.egress,
            egress_allow=state.egress_allow,
            # The node network: the host's bridge address and every other agent.
            forbid=(self.cni.subnet,) if state.netns else (),
            cgroup_parent=self.cgroup_parent,
            insecure_registry=tuple(self.insecure_registries),
            grace=self.grace_seconds,
            version=state.version or None,
            warm_slots=state.warm_slots,
            warm_image=tuple(state.warm_images),
            **state.warm_limits,  # type: ignore[arg-type]
            log_level=self.log_settings.level,
            log_format=self.log_settings.format,
        )
        return [*self.agent_argv, *args.argv()]

    def _save(self, agent: _Agent) -> None:
        path = agent.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(agent.state), indent=2) + "\n")
        os.replace(tmp, path)

    def _adopt(self, agent: _Agent) -> bool:
        """Watch the recorded pid if it is still this agent; False when it is gone."""
        pid = agent.state.pid
        if pid <= 0 or not _is_our_agent(pid, agent.state_dir):
            return False
        try:
            self._watch(agent, pid)
        except ProcessLookupError:
            return False
        agent.started_at = time.monotonic()
        return True

    def _watch(self, agent: _Agent, pid: int) -> None:
        self._unwatch(agent)
        agent.exited.clear()
        agent.pidfd = os.pidfd_open(pid)
        fd = agent.pidfd
        loop = asyncio.get_running_loop()

        def on_exit() -> None:
            loop.remove_reader(fd)
            agent.exited.set()
            self._wake.set()

        loop.add_reader(fd, on_exit)
        if _is_zombie(pid):
            on_exit()  # an exited child not yet reaped: the pidfd reports it too, but be sure

    def _unwatch(self, agent: _Agent) -> None:
        if agent.pidfd >= 0:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(agent.pidfd)
            os.close(agent.pidfd)
            agent.pidfd = -1

    def _reap(self, agent: _Agent) -> int | None:
        """Collect the exit status (when the process is our child); returns it if known."""
        if agent.popen is not None:
            return agent.popen.poll()
        with contextlib.suppress(ChildProcessError):
            _, status = os.waitpid(agent.state.pid, os.WNOHANG)
            return os.waitstatus_to_exitcode(status) if status else None
        return None

    async def _terminate(self, agent: _Agent) -> None:
        """SIGTERM, wait, SIGKILL; the process is gone (and reaped) when this returns."""
        if agent.pidfd >= 0 and not agent.exited.is_set():
            for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(agent.pidfd, sig)
                try:
                    async with asyncio.timeout(wait):
                        await agent.exited.wait()
                    break
                except TimeoutError:
                    log.warning("agent ignored %s", sig.name, extra={"agent": agent.state.name})
        self._reap(agent)
        self._unwatch(agent)

    # -- supervision -------------------------------------------------------------------------
    def _supervise_once(self) -> None:
        if self._closed:
            raise RuntimeError("fleet is closed")
        if not self._supervising:
            self._supervising = True
            self._tasks.spawn(guarded("fleet-supervisor", self._supervise), name="fleet-supervisor")

    async def _supervise(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            due: list[float] = []
            for agent in list(self._agents.values()):
                if agent.stopping or not agent.exited.is_set():
                    continue
                if agent.lock.locked():
                    due.append(now + 0.05)  # being started or stopped right now: look again
                    continue
                if agent.restart_at is None:
                    code = self._reap(agent)
                    self._unwatch(agent)
                    if now - agent.started_at >= HEALTHY_RUN_SECONDS:
                        agent.backoff = FIRST_BACKOFF
                    agent.restart_at = now + agent.backoff
                    log.warning(
                        "agent exited; restarting",
                        extra={
                            "agent": agent.state.name,
                            "pid": agent.state.pid,
                            "exit_code": code,
                            "in_seconds": agent.backoff,
                        },
                    )
                    agent.backoff = min(agent.backoff * 2, MAX_BACKOFF)
                if agent.restart_at > now:
                    due.append(agent.restart_at)
                    continue
                async with agent.lock:
                    if agent.stopping:
                        continue
                    try:
                        await self._launch(agent)
                        log.info(
                            "agent restarted",
                            extra={"agent": agent.state.name, "pid": agent.state.pid},
                        )
                    except Exception:
                        log.exception("agent restart failed", extra={"agent": agent.state.name})
                        agent.restart_at = time.monotonic() + agent.backoff
                        agent.backoff = min(agent.backoff * 2, MAX_BACKOFF)
                        due.append(agent.restart_at)
            timeout = max(min(due) - time.monotonic(), 0.0) if due else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    # Blocking, but only for the fork+exec (about a millisecond): the agent then runs on its own.
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def _is_our_agent(pid: int, state_dir: Path) -> bool:
    """Guards against pid reuse: the process must run with this agent's `--state-dir` (as
    `--state-dir=DIR`, or `--state-dir DIR` as agents started by older versions have it)."""
    args = _cmdline(pid)
    flag = flag_of("state_dir")
    return not _is_zombie(pid) and (
        f"{flag}={state_dir}" in args
        or any(a == flag and b == str(state_dir) for a, b in itertools.pairwise(args))
    )


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may itself hold spaces.
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


async def purge(data_dir: Path, cni: CniNetwork | None = None) -> None:
    """Kill every agent recorded under `data_dir` and delete their namespaces and addresses.

    For teardown (tests, uninstall) where no fleet runs; the state files stay (remove the dir).
    """
    cni = cni or CniNetwork()
    for path in (data_dir.resolve() / "agents").glob(f"*/{STATE_FILE}"):
        try:
            state = AgentState(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if state.pid > 0 and _is_our_agent(state.pid, path.parent):
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.pid, signal.SIGKILL)
        await _remove_sandbox_netns(state)
        if state.egress == "allow" and state.netns:
            await hostnet.remove_guard(state.ip)
        if state.netns:
            await netns.remove(state.netns, cni)


async def _remove_sandbox_netns(state: AgentState) -> None:
    """The agent's sandbox namespaces (its tag), once no agent runs to delete them itself."""
    tag = netplan.agent_tag(state.name)
    for path in sorted(netns.NETNS_DIR.glob(f"{netplan.NETNS_PREFIX}{tag}-*")):
        if netplan.parse_index(path.name, tag) is not None:
            with contextlib.suppress(Exception):
                await netns._run(["ip", "netns", "delete", path.name])
