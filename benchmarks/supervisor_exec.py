"""Exec round trip through fsb-supervisor against plain fork+exec, in one run.

Run after `scripts/setup` (no root needed):  .venv/bin/python benchmarks/supervisor_exec.py [-n 200]

It starts the real `native/bin/fsb-supervisor` (idle, as a plain child process, not PID 1) with
its channel in a temp dir, where the test suite's fake agent (tests/unit/supervisor_agent.py)
listens, and measures, interleaved, n times each:

  supervisor exec      boundary: the agent's `exec` request for `true` written on the control
                       connection → the exit report (JSON {"exit":…}) read on its data connection.
                       Includes the reply, the dial + HMAC handshake of the data connection,
                       fork + execve in the sandbox, reaping, draining the pipes.
  supervisor parked    the same, the exec naming a data connection parked before it (`park`,
                       PROTOCOL.md; untimed): what the agent does once a channel has had a stream
  asyncio subprocess   baseline: `asyncio.create_subprocess_exec("true")` with stdout/stderr
                       pipes → `communicate()` returned (fork+exec+wait from the same event loop)
  posix_spawn          floor: `os.posix_spawn("/bin/true")` → `os.waitpid` returned (no pipes)

It also prints the binary's size and the supervisor's VmRSS (/proc/PID/status) idle after the
control connection is up, and again after the runs, and its open descriptors (each exited
process must leave none behind). Milliseconds, p50/p95/p99/mean.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.unit.supervisor_agent import EOF, FakeAgent  # noqa: E402

TRUE = shutil.which("true") or "/bin/true"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def row(name: str, values: list[float]) -> str:
    return (
        f"{name:<20} n={len(values):<4} p50={pct(values, 50):7.2f}  p95={pct(values, 95):7.2f}"
        f"  p99={pct(values, 99):7.2f}  mean={statistics.fmean(values):7.2f}  ms"
    )


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def supervisor_exec(agent: FakeAgent) -> float:
    started = time.perf_counter()
    reply, conn = await agent.stream("exec", argv=[TRUE], env=[], stdin=False)
    assert reply["ok"] and conn is not None, reply
    out = await conn.collect()
    elapsed = (time.perf_counter() - started) * 1000
    assert out.exit["code"] == 0, out
    conn.send(EOF)
    conn.close()
    return elapsed


async def parked_exec(agent: FakeAgent) -> float:
    token = secrets.token_hex(16)
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    agent._streams[token] = fut
    assert (await agent.request("park", stream=token))["ok"]
    conn = fut.result()
    started = time.perf_counter()
    reply = await agent.request("exec", stream=token, argv=[TRUE], env=[], stdin=False)
    assert reply["ok"] and reply.get("parked") is True, reply
    out = await conn.collect()
    elapsed = (time.perf_counter() - started) * 1000
    assert out.exit["code"] == 0, out
    conn.close()
    return elapsed


async def asyncio_exec() -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        TRUE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    await proc.communicate()
    elapsed = (time.perf_counter() - started) * 1000
    assert proc.returncode == 0
    return elapsed


def spawn_exec() -> float:
    started = time.perf_counter()
    pid = os.posix_spawn(TRUE, [TRUE], {})
    _, status = os.waitpid(pid, 0)
    elapsed = (time.perf_counter() - started) * 1000
    assert os.waitstatus_to_exitcode(status) == 0
    return elapsed


def build() -> Path:
    built = subprocess.run(
        [str(ROOT / "scripts" / "build-native")], capture_output=True, text=True, check=True
    )
    return next(Path(p) for p in built.stdout.split() if p.endswith("/fsb-supervisor"))


def start(binary: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Idle (no command), like a sandbox whose work all comes through exec."""
    return subprocess.Popen([str(binary)], env=env, stderr=subprocess.DEVNULL)


async def main(binary: Path, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="fsb-sup-bench-") as tmp:
        secret = secrets.token_bytes(32)
        agent = await FakeAgent(Path(tmp), secret).start()
        env = {"FSB_CHANNEL": tmp, "FSB_SUPERVISOR_SECRET": secret.hex(), "FSB_SANDBOX_ID": "b"}
        proc = start(binary, env)
        try:
            await agent.wait_control()
            await asyncio.sleep(0.2)  # let start-up settle before reading RSS
            idle_rss = vm_rss_kib(proc.pid)
            for _ in range(10):  # warm-up: page cache, first-touch allocations
                await supervisor_exec(agent)
                await asyncio_exec()
                spawn_exec()
            sup: list[float] = []
            parked: list[float] = []
            aio: list[float] = []
            spawn: list[float] = []
            fds_before = len(os.listdir(f"/proc/{proc.pid}/fd"))
            for _ in range(n):
                sup.append(await supervisor_exec(agent))
                parked.append(await parked_exec(agent))
                aio.append(await asyncio_exec())
                spawn.append(spawn_exec())
            await asyncio.sleep(0.2)
            after_rss = vm_rss_kib(proc.pid)
            fds_after = len(os.listdir(f"/proc/{proc.pid}/fd"))
        finally:
            proc.terminate()
            proc.wait()
            await agent.stop()
    print(f"binary {binary}: {binary.stat().st_size / 1024:.0f} KiB (static, stripped)")
    print(f"supervisor VmRSS: idle {idle_rss} KiB, after {n} execs {after_rss} KiB")
    print(f"supervisor open fds: {fds_before} before, {fds_after} after {2 * n} execs")
    print(row("supervisor exec", sup))
    print(row("supervisor parked", parked))
    print(row("asyncio subprocess", aio))
    print(row("posix_spawn", spawn))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="runs of each (default 200)")
    asyncio.run(main(build(), parser.parse_args().n))
