"""The control plane's own cost of a burst: CPU per create of the server (Fast-Path with TLS,
token auth, edge limits, SQLite store, JSON logs), of its agents and of the SDK client, with
agents that are the real agent gRPC server and `SandboxManager` over `FakeRuntime` (one
process each, as `fsb server` runs them; no containerd, no root, no lock needed).

Run:  .venv/bin/python benchmarks/burst_control.py [--count 100 --agents 5 --rounds 5]
                                                  [--event-loop uvloop] [--profile DIR]

The server runs in a child process, the client in this one. Each round sends `count` creates
at once through one `AsyncClient`, then deletes them (untimed, outside the CPU count). Printed
per round: all replied (first create sent → last reply), and CPU milliseconds per create of
the server, of all agents together (both from /proc) and of the client (this process), the
work after the replies included (CPU is read once the server has stored every answered Fast
create and its events). `--profile DIR` samples the server with py-spy during the creates only
(raw collapsed stacks in DIR; top self-time frames and our functions' inclusive share
printed). No containerd: this is what the plane adds to a real burst, on top of the runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import summary  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
NATIVE = ["--native"] if os.environ.get("BURST_NATIVE") else ["--nonblocking"]
TOKEN = "burst-control-token"
POOL = "burst"


def _proc_cpu(pid: int, task: int | None = None) -> float:
    """CPU seconds of process `pid` (or of its thread `task`)."""
    path = f"/proc/{pid}/task/{task}/stat" if task is not None else f"/proc/{pid}/stat"
    stat = Path(path).read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


# -- the agents (one process each, as `fsb server`'s are) ----------------------------------------


def agent_main(root: Path, name: str, pool: str, capacity: int, ip: str) -> int:
    """One agent: the real gRPC server and SandboxManager over a FakeRuntime."""
    from fastsandbox._aio.loop import run as run_loop
    from fastsandbox.agent.runtime.fake import FakeRuntime
    from fastsandbox.agent.server import run as run_agent
    from fastsandbox.logconfig import configure
    from fastsandbox.settings import AgentSettings, LogSettings

    configure(LogSettings(format="json"), component="agent")
    settings = AgentSettings(
        name=name,
        pool=pool,
        namespace="default",
        listen=f"unix://{root / 'a.sock'}",
        state_dir=root,
        containerd_socket=Path("/nonexistent"),
        capacity=capacity,
        agent_ip=ip,
    )

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(15, stop.set)
        await run_agent(settings, ready=None, stop=stop, runtime=FakeRuntime())

    run_loop(main())
    return 0


class ProcessFleet:
    """An `AgentFleet` of agent processes over FakeRuntime (see `agent_main`)."""

    def __init__(self, root: Path) -> None:
        from fastsandbox.fleet.base import AgentHandle

        self.root = root
        self._procs: dict[str, tuple[AgentHandle, subprocess.Popen[bytes]]] = {}

    async def start(self) -> list[object]:
        return [h for h, _ in self._procs.values()]

    async def start_agent(self, pool: object, name: str) -> object:
        from fastsandbox.fleet.base import AgentHandle

        meta, spec = pool.metadata, pool.spec  # type: ignore[attr-defined]
        state = self.root / name
        state.mkdir(parents=True, exist_ok=True)
        ip = f"10.99.0.{len(self._procs) + 2}"
        log = (state / "agent.log").open("wb")
        proc = subprocess.Popen(  # noqa: ASYNC220 - a spawn, not a wait
            [sys.executable, __file__, "--agent", str(state), name, meta.name,
             str(spec.max_sandboxes_per_agent), ip],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        log.close()
        handle = AgentHandle(name=name, pool=meta.name, namespace=meta.namespace,
                             target=f"unix://{state / 'a.sock'}", ip=ip)  # fmt: skip
        self._procs[name] = (handle, proc)
        while not (state / "a.sock").exists():
            await asyncio.sleep(0.05)
        return handle

    def pids(self) -> list[int]:
        return [proc.pid for _, proc in self._procs.values()]

    async def stop_agent(self, name: str) -> None:
        _, proc = self._procs.pop(name)
        proc.terminate()
        await asyncio.to_thread(proc.wait)

    async def agents(self) -> list[object]:
        return [h for h, _ in self._procs.values()]

    async def close(self) -> None:
        for name in list(self._procs):
            await self.stop_agent(name)


# -- the server (child process) ----------------------------------------------------------------


async def _serve(root: Path, port: int, agents: int, per_agent: int) -> None:
    from fastsandbox.api.models import (
        NetworkMode,
        ObjectMeta,
        PoolCapacity,
        SandboxPool,
        SandboxPoolSpec,
    )
    from fastsandbox.control.fastpath.access import AccessGuard
    from fastsandbox.control.fastpath.authz import NamespaceAuthorizer, TokenAuthenticator
    from fastsandbox.control.fastpath.serve import start_fastpath
    from fastsandbox.control.fastpath.tls import data_dir_tls
    from fastsandbox.control.plane import ControlPlane, PlaneSettings
    from fastsandbox.store.sqlite import SqliteStore
    from fastsandbox.store.tokens_sqlite import SqliteTokenStore

    exp = os.environ.get("BURST_EXP", "")
    if "mem" in exp:
        from fastsandbox.store.memory import MemoryStore

        store = MemoryStore()
    else:
        store = await SqliteStore.open(root / "fsb.db")
    tokens = await SqliteTokenStore.open(root / "tokens.db")
    await store.create(
        SandboxPool(
            metadata=ObjectMeta(name=POOL),
            spec=SandboxPoolSpec(
                capacity=PoolCapacity(pool_min=agents, pool_max=agents),
                max_sandboxes_per_agent=per_agent,
                network_mode=NetworkMode.SHARED,
            ),
        )
    )
    fleet = ProcessFleet(root / "agents")
    plane = ControlPlane(store, fleet, PlaneSettings(delete_grace_seconds=0))  # type: ignore[arg-type]
    await plane.start()
    if "nolog" in exp:
        import logging

        logging.getLogger().setLevel(logging.WARNING)
    if "noevents" in exp:
        plane.sandboxes.events.record = lambda *a, **k: None  # type: ignore[method-assign]
    tls = data_dir_tls(root / "tls", ["127.0.0.1", "localhost"])
    guard = AccessGuard(TokenAuthenticator(TOKEN, tokens), NamespaceAuthorizer())
    server = await start_fastpath(plane.servicer, guard, f"127.0.0.1:{port}", tls)
    while sum(1 for a in plane.registry.agents() if a.ready) < agents:
        await asyncio.sleep(0.05)
    sys.stdout.write(" ".join(str(p) for p in fleet.pids()) + "\n")
    sys.stdout.flush()
    # Each line on stdin: "flush" → wait until every answered create is stored and the
    # reconciler has looked at it, then "ok"; "cprofile PATH" / "cprofile-off": deterministic
    # profile of this process's event loop into PATH (pstats).
    loop = asyncio.get_running_loop()
    profiler: cProfile.Profile | None = None
    target = ""
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        word, _, arg = line.strip().partition(" ")
        if not line or word == "stop":
            break
        if word == "cprofile":
            profiler, target = cProfile.Profile(), arg
            profiler.enable()
        elif word == "cprofile-off" and profiler is not None:
            profiler.disable()
            profiler.dump_stats(target)
            profiler = None
        else:
            await plane.sandboxes.flush()
            await plane.sandboxes.events.flush()
            await asyncio.sleep(0.3)  # the reconciler's pass over the new records
            await plane.sandboxes.events.flush()
        sys.stdout.write("ok\n")
        sys.stdout.flush()
    await server.stop(0)
    await plane.close()
    await fleet.close()
    await store.close()
    await tokens.close()


def serve_main(root: Path, port: int, agents: int, per_agent: int) -> int:
    from fastsandbox._aio.loop import run as run_loop
    from fastsandbox.logconfig import configure
    from fastsandbox.settings import LogSettings

    # As `fsb server` logs when not on a terminal: JSON lines on stderr (here a file).
    configure(LogSettings(format="json"), component="server")
    run_loop(_serve(root, port, agents, per_agent))
    return 0


# -- the client (this process) -----------------------------------------------------------------


async def _round(endpoint: str, ca: Path, count: int, tag: str) -> tuple[float, list[float]]:
    from fastsandbox.sdk import AsyncClient

    async with AsyncClient(endpoint=endpoint, token=TOKEN, ca_file=ca) as client:
        names = [f"bc-{tag}-{i:03d}" for i in range(count)]
        replies: list[float] = []

        async def one(name: str) -> None:
            began = time.perf_counter()
            await client.create(name, "127.0.0.1:5000/busybox:latest", pool=POOL,
                                command=["sleep", "3600"])  # fmt: skip
            replies.append((time.perf_counter() - began) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in names))
        took = (time.perf_counter() - started) * 1000
    return took, replies


async def _delete_all(endpoint: str, ca: Path, count: int, tag: str) -> None:
    from fastsandbox.sdk import AsyncClient

    async with AsyncClient(endpoint=endpoint, token=TOKEN, ca_file=ca) as client:
        await asyncio.gather(*(client.delete(f"bc-{tag}-{i:03d}", wait=True) for i in range(count)))


def _stacks(raws: list[Path]) -> list[tuple[str, list[str], int]]:
    """(thread name, frames, samples) of py-spy's raw output recorded with --threads."""
    out = []
    for raw in raws:
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack:
                thread, *frames = stack.split(";")
                name = thread.partition(": ")[2].partition(" (")[0]
                out.append((name, frames or [thread], int(count)))
    return out


def _threads(raws: list[Path]) -> list[tuple[float, str]]:
    by: collections.Counter[str] = collections.Counter()
    for thread, _, count in _stacks(raws):
        by[thread] += count
    total = sum(by.values()) or 1
    return [(c * 100 / total, t) for t, c in by.most_common()]


def _top(raws: list[Path], k: int = 25) -> list[tuple[float, str]]:
    """Self time of the event loop's thread, by frame (% of that thread's samples)."""
    self_time: collections.Counter[str] = collections.Counter()
    for thread, frames, count in _stacks(raws):
        if thread == "MainThread":
            self_time[frames[-1]] += count
    total = sum(self_time.values()) or 1
    return [(c * 100 / total, f) for f, c in self_time.most_common(k)]


def _inclusive(raws: list[Path], k: int = 45) -> list[tuple[float, str]]:
    """Samples of the event loop's thread under each of our (and grpc's) functions, a frame
    counted once per stack (% of that thread's samples)."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for thread, frames, count in _stacks(raws):
        if thread != "MainThread":
            continue
        total += count
        ours = {re.sub(r":\d+\)$", ")", f) for f in frames if "fastsandbox/" in f or "grpc/" in f}
        for f in ours:
            inclusive[f] += count
    return [(c * 100 / (total or 1), f) for f, c in inclusive.most_common(k)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument(
        "--cprofile", type=Path, default=None, help="cProfile the creates (one round) into this"
    )
    parser.add_argument("--agent", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--serve", nargs=4, metavar=("ROOT", "PORT", "AGENTS", "PER"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.agent:
        state, name, pool, capacity, ip = args.agent
        return agent_main(Path(state), name, pool, int(capacity), ip)
    if args.serve:
        root, port, agents, per = args.serve
        return serve_main(Path(root), int(port), int(agents), int(per))

    from tests.e2e._server import free_port

    os.environ["FSB_EVENT_LOOP"] = args.event_loop
    per_agent = -(-args.count // args.agents)
    tmp = Path(tempfile.mkdtemp(prefix="fsb-burst-control-"))
    port = free_port()
    log = (tmp / "server.log").open("w")
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(tmp), str(port), str(args.agents),
         str(per_agent)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    spy = None
    try:
        first = child.stdout.readline().split()
        if not first:
            raise RuntimeError(f"server did not start: see {tmp / 'server.log'}")
        agent_pids = [int(p) for p in first]
        endpoint, ca = f"127.0.0.1:{port}", tmp / "tls" / "ca.crt"

        def flush(command: str = "flush") -> None:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(command + "\n")
            child.stdin.flush()
            child.stdout.readline()

        print(f"event loop: {args.event_loop}; {args.count} creates over {args.agents} agents "
              f"(fake runtime), {args.rounds} rounds + 1 warm-up")  # fmt: skip
        asyncio.run(_round(endpoint, ca, args.count, "warmup"))
        flush()
        asyncio.run(_delete_all(endpoint, ca, args.count, "warmup"))
        pyspy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
        walls: list[float] = []
        per_reply: list[float] = []
        server_ms: list[float] = []
        client_ms: list[float] = []
        agent_ms: list[float] = []
        main_ms: list[float] = []
        for r in range(args.rounds):
            if args.profile is not None:
                # Only the creates and their stores are sampled, not the deletes.
                spy = subprocess.Popen(
                    [pyspy, "record", "-p", str(child.pid), "-r", "500", "-f", "raw", "-o",
                     str(args.profile / f"server-{r}.txt"), "--threads", *NATIVE],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(1.0)
            if args.cprofile is not None:
                flush(f"cprofile {args.cprofile.resolve()}")
            s0, c0 = _proc_cpu(child.pid), time.process_time()
            a0 = sum(_proc_cpu(p) for p in agent_pids)
            m0 = _proc_cpu(child.pid, child.pid)
            took, replies = asyncio.run(_round(endpoint, ca, args.count, str(r)))
            flush()
            s1, c1 = _proc_cpu(child.pid), time.process_time()
            a1 = sum(_proc_cpu(p) for p in agent_pids)
            m1 = _proc_cpu(child.pid, child.pid)
            if args.cprofile is not None:
                flush("cprofile-off")
                flush("flush")  # keep the process alive for the next round's "cprofile"
            if spy is not None:
                spy.send_signal(2)
                spy.wait(timeout=30)
                spy = None
            walls.append(took)
            per_reply.extend(replies)
            server_ms.append((s1 - s0) * 1000 / args.count)
            client_ms.append((c1 - c0) * 1000 / args.count)
            agent_ms.append((a1 - a0) * 1000 / args.count)
            main_ms.append((m1 - m0) * 1000 / args.count)
            print(f"  round {r}: all replied {took:7.1f} ms; CPU per create: server "
                  f"{server_ms[-1]:.2f} ms (event loop {main_ms[-1]:.2f}), agents "
                  f"{agent_ms[-1]:.2f} ms, client {client_ms[-1]:.2f} ms")  # fmt: skip
            asyncio.run(_delete_all(endpoint, ca, args.count, str(r)))
        for name, values in (
            ("all replied (ms)", walls),
            ("per-create reply (ms)", per_reply),
            ("server CPU per create (ms)", server_ms),
            ("server event loop's thread (ms)", main_ms),
            ("agents CPU per create (ms)", agent_ms),
            ("client CPU per create (ms)", client_ms),
        ):
            s = summary(values)
            print(f"  {name:<28} n={s['n']:<4} p50={s['p50']:8.2f} p95={s['p95']:8.2f} "
                  f"max={s['max']:8.2f}")  # fmt: skip
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait(timeout=30)
        with_stdin = child.stdin
        try:
            with_stdin.write("stop\n")
            with_stdin.flush()
            child.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()
            child.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.profile is not None:
        raws = sorted(args.profile.glob("server-*.txt"))
        print("py-spy server, creates only: samples per thread")
        for pc, thread in _threads(raws):
            print(f"  {pc:5.1f}%  {thread}")
        print("event loop's thread: top self-time frames (% of its samples)")
        for pc, frame in _top(raws):
            print(f"  {pc:5.1f}%  {frame[:150]}")
        print("event loop's thread: inclusive time of our functions (% of its samples)")
        for pc, frame in _inclusive(raws):
            print(f"  {pc:5.1f}%  {frame[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
