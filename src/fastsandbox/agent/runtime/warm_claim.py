"""What claiming a warm container changes on the host: its hostname, its cgroup limits, and its
record (the OCI spec and labels containerd keeps for it).

Why from the host, and not through containerd's task Update (`runc update`) or the supervisor:
- Limits: `runc update` forks runc (milliseconds, on the request path) to write the same few
  cgroup files the agent (root, owner of the sandbox's cgroup) can write itself in microseconds.
  The values are the ones runc would have written for the cold spec (`oci_spec.linux_resources`,
  translated as runc translates them, v1 and v2), so a claimed slot's cgroup reads the same.
- Hostname: the container has no CAP_SYS_ADMIN, so its PID 1 cannot `sethostname`. A fresh
  thread of the agent joins the container's UTS namespace (`setns` on /proc/PID/ns/uts), sets
  it and ends: the namespace change dies with the thread, and no pooled thread is left in a
  sandbox's namespace.
- Record: the container record is rewritten to exactly what a cold create would have stored
  (command, env, cwd, hostname, limits, labels), so recovery, `process_defaults` and the
  janitor read a claimed slot like any other sandbox.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fastsandbox.agent.runtime.oci_spec import (
    INIT_MOUNT,
    MAX_HOSTNAME,
    supervisor_mode_env,
)

T = TypeVar("T")
CGROUP_ROOT = Path("/sys/fs/cgroup")
_CLONE_NEWUTS = 0x04000000


def claimed_oci(
    oci: Mapping[str, Any],
    *,
    sandbox_id: str,
    argv: Sequence[str],
    env: Sequence[str],
    cwd: str,
    resources: Mapping[str, Any],
) -> dict[str, Any]:
    """The warm container's OCI spec rewritten to the cold spec of the sandbox: PID 1's command
    line as a cold start's, the process env (keeping PID 1's own FSB_* channel variables, which
    a cold spec carries too), cwd, hostname and limits."""
    spec = dict(oci)
    process = dict(spec.get("process") or {})
    own = [
        e
        for e in process.get("env") or ()
        if str(e).startswith("FSB_") and not str(e).startswith(("FSB_WARM=", "FSB_MAIN="))
    ]
    process["args"] = [INIT_MOUNT]
    process["env"] = [*env, *own, *supervisor_mode_env(argv, warm=False)]
    process["cwd"] = cwd or "/"
    spec["process"] = process
    spec["hostname"] = sandbox_id[:MAX_HOSTNAME]
    linux = dict(spec.get("linux") or {})
    linux["resources"] = dict(resources)
    spec["linux"] = linux
    return spec


def cpu_weight(shares: int) -> int:
    """cgroup v2 `cpu.weight` from v1 shares, as runc converts them."""
    return 1 + ((shares - 2) * 9999) // 262142


def cgroup_writes(
    cgroups_path: str, resources: Mapping[str, Any], root: Path = CGROUP_ROOT
) -> list[tuple[Path, str]]:
    """(file, value) to write, in order, for `resources` (`oci_spec.linux_resources`) on the
    cgroup at `cgroups_path`: cgroup v2 when `root` is a unified hierarchy, else v1."""
    rel = cgroups_path.strip("/")
    memory = resources.get("memory") or {}
    cpu = resources.get("cpu") or {}
    pids = (resources.get("pids") or {}).get("limit")
    out: list[tuple[Path, str]] = []
    if (root / "cgroup.controllers").exists():
        base = root / rel
        if memory:
            out.append((base / "memory.max", str(memory["limit"])))
            swap = int(memory.get("swap", memory["limit"])) - int(memory["limit"])
            if (base / "memory.swap.max").exists():
                out.append((base / "memory.swap.max", str(max(swap, 0))))
        if cpu:
            out.append((base / "cpu.weight", str(cpu_weight(int(cpu["shares"])))))
            out.append((base / "cpu.max", f"{cpu['quota']} {cpu['period']}"))
        if pids:
            out.append((base / "pids.max", str(pids)))
        return out
    if memory:
        mem = root / "memory" / rel
        out.append((mem / "memory.limit_in_bytes", str(memory["limit"])))
        if (mem / "memory.memsw.limit_in_bytes").exists():
            out.append((mem / "memory.memsw.limit_in_bytes", str(memory["swap"])))
    if cpu:
        c = root / "cpu" / rel
        out += [
            (c / "cpu.shares", str(cpu["shares"])),
            (c / "cpu.cfs_period_us", str(cpu["period"])),
            (c / "cpu.cfs_quota_us", str(cpu["quota"])),
        ]
    if pids:
        out.append((root / "pids" / rel / "pids.max", str(pids)))
    return out


def _setns_uts(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns = getattr(os, "setns", None)
        if setns is not None:  # Python 3.12+
            setns(fd, _CLONE_NEWUTS)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWUTS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns(/proc/{pid}/ns/uts): {os.strerror(err)}")
    finally:
        os.close(fd)


def prepare(pid: int, hostname: str, writes: Sequence[tuple[Path, str]]) -> None:
    """In a thread of its own (it leaves that thread in the container's UTS namespace): set the
    container's hostname and its cgroup limits."""
    _setns_uts(pid)
    socket.sethostname(hostname[:MAX_HOSTNAME])
    for path, value in writes:
        path.write_text(value)


async def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` in a new thread that ends with it (not the loop's pool: a thread that
    joined a sandbox's namespace must not run anything else)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as err:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, err)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="fsb-claim", daemon=True).start()
    return await done
