"""Pod network namespaces for the process kubelet (tests/k8s_kubelet.py, `pod_network=True`).

By default the process kubelet runs every Pod in the test's own (the host's) network namespace
with a 127.0.x.y address. A Pod that must have a namespace of its own, as on a real node (an
agent of a `private` pool sets iptables rules in it), gets one here, made and removed by name:

    host: fk<i> 10.214.a.(2b)/31  ── veth ──  Pod netns fsbk-<i>: eth0 10.214.a.(2b+1)/31
                                                lo up, default via the host end

A /31 per Pod, so no bridge is made and nothing of one Pod is on-link for another; no filter or
NAT rule is set on the host (routes follow from the addresses). The host reaches the Pod's IP
(the controller dials the agent's API, tests dial published ports) and the Pod the host end.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import sys
from dataclasses import dataclass

SUBNET = ipaddress.ip_network("10.214.0.0/16")
NETNS_PREFIX = "fsbk-"
VETH_PREFIX = "fk"
SLOTS = SUBNET.num_addresses // 2


@dataclass(frozen=True)
class PodNet:
    index: int

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.index}"

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    @property
    def veth(self) -> str:
        return f"{VETH_PREFIX}{self.index:x}"

    @property
    def host_ip(self) -> str:
        return str(SUBNET.network_address + 2 * self.index)

    @property
    def ip(self) -> str:
        return str(SUBNET.network_address + 2 * self.index + 1)

    def enter(self, argv: list[str]) -> list[str]:
        """`argv` run in the Pod's namespace (same mount namespace and privileges)."""
        return ["nsenter", f"--net={self.path}", "--", *argv]


async def _run(*argv: str, check: bool = True) -> bool:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()}")
    return proc.returncode == 0


async def make() -> PodNet:
    """A new Pod namespace wired to the host. The index is random; `ip netns add` of a name in
    use fails, so two kubelets (another test run) never share one."""
    for _ in range(50):
        net = PodNet(random.randrange(1, SLOTS - 1))
        if not await _run("ip", "netns", "add", net.netns, check=False):
            continue
        try:
            for argv in (
                ["ip", "link", "add", net.veth, "type", "veth", "peer", "name", "eth0",
                 "netns", net.netns],
                ["ip", "addr", "add", f"{net.host_ip}/31", "dev", net.veth],
                ["ip", "link", "set", net.veth, "up"],
                ["ip", "-n", net.netns, "link", "set", "lo", "up"],
                ["ip", "-n", net.netns, "addr", "add", f"{net.ip}/31", "dev", "eth0"],
                ["ip", "-n", net.netns, "link", "set", "eth0", "up"],
                ["ip", "-n", net.netns, "route", "add", "default", "via", net.host_ip],
            ):  # fmt: skip
                await _run(*argv)
        except BaseException:
            await asyncio.shield(remove(net))
            raise
        return net
    raise RuntimeError("no free Pod network namespace name")


async def remove(net: PodNet) -> None:
    """Delete the namespace (its veth end, and so the host's, go with it); fine when gone."""
    await _run("ip", "link", "delete", net.veth, check=False)
    await _run("ip", "netns", "delete", net.netns, check=False)


_LISTEN = """
import socket, sys
chan = socket.socket(fileno=int(sys.argv[1]))
socks = []
for port in sys.argv[2:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(port)))
    s.listen(64)
    socks.append(s)
socket.send_fds(chan, [b"ok"], [s.fileno() for s in socks])
"""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def forward_loopback(net: PodNet, ports: list[int]) -> list[asyncio.Server]:
    """Listeners on the Pod's 127.0.0.1:`port` relayed to the host's 127.0.0.1:`port`.

    The session's registry listens on the host's loopback; on a real node a Pod reaches its
    registry over the Pod network. The listening sockets are made inside the Pod's namespace
    by a short child (`nsenter`) and handed back over a Unix socket (SCM_RIGHTS): a socket
    keeps the namespace it was made in, so this process accepts there and dials here."""
    if not ports:
        return []
    ours, theirs = socket.socketpair()
    try:
        proc = await asyncio.create_subprocess_exec(
            *net.enter([sys.executable, "-c", _LISTEN, str(theirs.fileno()), *map(str, ports)]),
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        _, fds, _, _ = await asyncio.to_thread(socket.recv_fds, ours, 16, len(ports))
        await proc.wait()
    finally:
        ours.close()
        theirs.close()
    if len(fds) != len(ports):
        raise RuntimeError(f"could not listen on {ports} in {net.netns}")
    servers = []
    for fd, port in zip(fds, ports, strict=True):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)

        async def relay(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int = port
        ) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        servers.append(await asyncio.start_server(relay, sock=sock))
    return servers
