"""Find a containerd to talk to, or start our own under the data dir.

`fsb server` on a machine without a running containerd (no systemd, a fresh VM, CI) must still
work with one command, so it starts `containerd` with a config of its own (root, state and socket
under the data dir; the CRI plugin disabled, as we speak to containerd's own API). The daemon is
started in its own session so it outlives a killed server: running sandboxes belong to their
shims, and a restarted server finds the same containerd through its pid file and socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from fastsandbox.errors import RuntimeFailure
from fastsandbox.settings import CONTAINERD_SOCKET

log = logging.getLogger(__name__)

SYSTEM_SOCKET = CONTAINERD_SOCKET

_CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[debug]
  level = "warn"
"""


@dataclass(slots=True)
class Containerd:
    socket: Path
    # Set when we started (or adopted) the daemon, so we stop it on a clean shutdown.
    pid: int | None = None

    async def stop(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(self.pid):
            await asyncio.sleep(0.05)
        if _alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; reap it so it counts as gone.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


async def answers(socket: Path, timeout: float = 1.0) -> bool:
    """True when a containerd serves gRPC on `socket`."""
    if not socket.exists():
        return False
    channel = grpc.aio.insecure_channel(f"unix://{socket}")
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
        return True
    except (TimeoutError, grpc.aio.AioRpcError):
        return False
    finally:
        await channel.close(None)


async def ensure(data_dir: Path, socket: Path | None) -> Containerd:
    """The containerd to use: `socket` if given, else the system one, else our own."""
    if socket is not None:
        if not await answers(socket, timeout=5.0):
            raise RuntimeFailure(f"no containerd answers on {socket}; start it or drop the flag")
        return Containerd(socket)
    if await answers(SYSTEM_SOCKET):
        log.info("using the system containerd", extra={"socket": str(SYSTEM_SOCKET)})
        return Containerd(SYSTEM_SOCKET)
    return await _start_own(data_dir / "containerd")


async def _start_own(home: Path) -> Containerd:
    home.mkdir(parents=True, exist_ok=True)
    socket = home / "ctd.sock"
    pid_file = home / "containerd.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        if pid and _alive(pid) and await answers(socket):
            log.info("adopting our containerd", extra={"pid": pid, "socket": str(socket)})
            return Containerd(socket, pid)
    config = home / "config.toml"
    config.write_text(_CONFIG.format(root=home / "root", state=home / "state", socket=socket))
    log_file = open(home / "containerd.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = await asyncio.create_subprocess_exec(
            "containerd",
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise RuntimeFailure(
            "containerd is not installed: run `scripts/setup` (or apt-get install containerd runc)"
        ) from None
    finally:
        log_file.close()
    pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            break
        if await answers(socket, timeout=0.5):
            log.info("started containerd", extra={"pid": proc.pid, "socket": str(socket)})
            return Containerd(socket, proc.pid)
        await asyncio.sleep(0.05)
    tail = (home / "containerd.log").read_text(errors="replace")[-800:]
    raise RuntimeFailure(f"containerd did not start (see {home / 'containerd.log'}): {tail}")
