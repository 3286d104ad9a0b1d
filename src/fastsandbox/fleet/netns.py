"""Network namespaces for agents, wired with the CNI `bridge` + `host-local` plugins.

Every agent owns one named namespace (`ip netns add fsb-<agent>`, a bind mount under
/var/run/netns that outlives any process) with its own IP on the host bridge, so sandboxes that
join it get endpoints `agentIP:port` that never clash with another agent's ports.

Why the plugins are executed directly (the CNI spec's protocol: `CNI_*` environment, network
config on stdin, result JSON on stdout) and not through a CNI library: it is two exec calls, and
the Debian package (`containernetworking-plugins`, 1.1.1, supports CNI 0.1.0..1.0.0) ships only
the binaries.

Choices, and why:
- `isGateway: false` and the bridge's address set by us (`ip addr replace`): with `isGateway`
  the plugin also turns on the host-wide `net.ipv4.ip_forward`, which we have no reason to change.
- No default route and no masquerading in the namespace: sandboxes reach the host and other
  agents on the bridge, nothing beyond it (traffic never leaves the machine).
- host-local keeps its reservations in one host-wide directory, because the bridge and subnet
  are host-wide: two data dirs (a dev server and a test run) sharing the bridge must not hand out
  the same address. Reservations whose namespace is gone (reboot, `ip netns del` by hand) are
  collected before each allocation. An agent's IP survives restarts because it is kept in the
  agent's state file and requested again (`CNI_ARGS=IP=...`) when the namespace must be remade.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsandbox.errors import RuntimeFailure

log = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")
CNI_PLUGIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
# The newest version the Debian 1.1.1 plugins speak (`CNI_COMMAND=VERSION` lists 0.1.0..1.0.0).
CNI_VERSION = "1.0.0"
IFNAME = "eth0"
# host-local's reservation files hold "<container id>\r\n<ifname>"; ours all start with this.
NETNS_PREFIX = "fsb-"


@dataclass(frozen=True, slots=True)
class CniNetwork:
    """The host bridge agents attach to. Defaults suit every server on the machine."""

    name: str = "fastsandbox"
    """CNI network name; also host-local's reservation subdirectory."""
    bridge: str = "fsb0"
    """Host bridge (at most 15 characters)."""
    subnet: str = "10.209.0.0/24"
    """Agent addresses; .1 is the bridge. Chosen to be unlikely to clash with real networks."""
    ipam_dir: Path = Path("/var/lib/cni/networks")
    """host-local `dataDir` (host-wide on purpose: see the module docstring)."""
    plugin_dirs: tuple[Path, ...] = CNI_PLUGIN_DIRS

    def plugin_dir(self) -> Path | None:
        for directory in self.plugin_dirs:
            if all(os.access(directory / p, os.X_OK) for p in ("bridge", "host-local")):
                return directory
        return None

    def unavailable_reason(self) -> str | None:
        """Why CNI cannot be used here, or None when it can."""
        if self.plugin_dir() is None:
            dirs = ", ".join(str(d) for d in self.plugin_dirs)
            return f"CNI bridge/host-local plugins not found in {dirs}"
        if os.geteuid() != 0:
            return "network namespaces need root"
        return None

    @property
    def gateway(self) -> str:
        net = ipaddress.ip_network(self.subnet)
        return f"{next(net.hosts())}/{net.prefixlen}"

    def config(self) -> bytes:
        return json.dumps(
            {
                "cniVersion": CNI_VERSION,
                "name": self.name,
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": False,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "subnet": self.subnet,
                    "dataDir": str(self.ipam_dir),
                },
            }
        ).encode()


def netns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


async def _run(
    argv: list[str], *, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        # CNI plugins report errors as JSON on stdout; `ip` on stderr.
        detail = err.decode(errors="replace").strip()
        try:
            detail = json.loads(out).get("msg", detail) or detail
        except (ValueError, AttributeError):
            detail = detail or out.decode(errors="replace").strip()
        raise RuntimeFailure(f"{' '.join(argv)} failed (exit {proc.returncode}): {detail[-500:]}")
    return out


async def _cni(command: str, name: str, network: CniNetwork, ip: str | None = None) -> bytes:
    plugins = network.plugin_dir()
    if plugins is None:
        raise RuntimeFailure(network.unavailable_reason() or "CNI plugins not found")
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": name,
        "CNI_NETNS": netns_path(name),
        "CNI_IFNAME": IFNAME,
        "CNI_PATH": str(plugins),
    }
    if ip is not None:
        # host-local honours a requested address; IgnoreUnknown keeps bridge from refusing it.
        env["CNI_ARGS"] = f"IgnoreUnknown=1;IP={ip}"
    return await _run([str(plugins / "bridge")], env=env, stdin=network.config())


async def current_ip(name: str) -> str | None:
    """The IPv4 address of the namespace's `eth0`, or None (no namespace, no interface)."""
    if not exists(name):
        return None
    try:
        out = await _run(["ip", "-n", name, "-4", "-o", "addr", "show", "dev", IFNAME])
    except RuntimeFailure:
        return None
    for word_index, word in enumerate(parts := out.decode().split()):
        if word == "inet" and word_index + 1 < len(parts):
            return parts[word_index + 1].split("/")[0]
    return None


def collect_stale_reservations(network: CniNetwork) -> int:
    """Drop host-local reservations of our namespaces that no longer exist; returns how many."""
    directory = network.ipam_dir / network.name
    removed = 0
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            ipaddress.ip_address(entry.name)
            owner = entry.read_text().splitlines()[0].strip()
        except (ValueError, IndexError, OSError):
            continue  # lock, last_reserved_ip.0, or a file mid-write
        if owner.startswith(NETNS_PREFIX) and not exists(owner):
            entry.unlink(missing_ok=True)
            removed += 1
            log.info("dropped a stale IP reservation", extra={"ip": entry.name, "netns": owner})
    return removed


async def _ensure_gateway(network: CniNetwork) -> None:
    # Idempotent; also repairs a bridge that lost its address.
    await _run(["ip", "addr", "replace", network.gateway, "dev", network.bridge])
    await _run(["ip", "link", "set", network.bridge, "up"])


async def ensure(name: str, network: CniNetwork, *, want_ip: str | None = None) -> str:
    """Make (or reuse) namespace `name` attached to the bridge; returns its IP.

    An existing namespace that has an address (the one wanted, if given) is reused untouched, so
    sandboxes running in it keep their network. Anything half-made is torn down and rebuilt,
    asking for `want_ip` again; if another owner took that address meanwhile, a new one is taken.
    """
    if not name.startswith(NETNS_PREFIX):
        raise ValueError(f"netns name must start with {NETNS_PREFIX!r}: {name}")
    ip = await current_ip(name)
    if ip is not None and (want_ip is None or ip == want_ip):
        await _ensure_gateway(network)
        return ip
    await remove(name, network)
    network.ipam_dir.mkdir(parents=True, exist_ok=True)
    collect_stale_reservations(network)
    await _run(["ip", "netns", "add", name])
    try:
        await _run(["ip", "-n", name, "link", "set", "lo", "up"])
        try:
            out = await _cni("ADD", name, network, want_ip)
        except RuntimeFailure as exc:
            if want_ip is None:
                raise
            log.warning(
                "could not get the agent's previous IP back; taking a new one",
                extra={"netns": name, "ip": want_ip, "err": exc.message},
            )
            out = await _cni("ADD", name, network)
        ip = _ip_from_result(out)
        await _ensure_gateway(network)
    except BaseException:
        await remove(name, network)
        raise
    log.info("network namespace ready", extra={"netns": name, "ip": ip})
    return ip


def _ip_from_result(out: bytes) -> str:
    try:
        result: dict[str, Any] = json.loads(out)
        return str(result["ips"][0]["address"]).split("/")[0]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeFailure(f"unexpected CNI result: {out[:300]!r}") from exc


async def remove(name: str, network: CniNetwork) -> None:
    """Release the address (CNI DEL) and delete the namespace; fine if either is gone already."""
    if network.plugin_dir() is not None:
        try:
            # Before the namespace goes: a reservation whose namespace is missing counts as
            # stale for `collect_stale_reservations`, so it must never be the live state.
            await _cni("DEL", name, network)
        except RuntimeFailure as exc:
            log.warning("CNI DEL failed", extra={"netns": name, "err": exc.message})
    if exists(name):
        await _run(["ip", "netns", "delete", name])
