"""A private network per sandbox, end to end (issue 10 item 1; DESIGN.md §6b): a real `fsb
server`, real agents in their CNI namespaces, real containerd + runc; every check is made from
inside a sandbox with `fsb exec` and busybox's `nc`/`wget`, against listeners the test runs
itself, each of which is first shown reachable from outside the sandbox (so a failure from inside
is the isolation, not a missing listener).

Embedded shape; the Kubernetes shape's version is tests/e2e/test_kube_private_network.py.

Warm slots (pool `wiso`, --warm-slots 1): sandboxes that claimed a slot get the same checks — each
endpoint reaches its own sandbox, no other sandbox nor the host, the agent's namespace or
metadata is reachable, and a delete leaves no namespace, veth or DNAT rule.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastsandbox.agent.network import plan
from tests.e2e._server import Server, new_server, purge
from tests.fault._leaks import inventory, leaks
from tests.infra import cannot_run

pytestmark = pytest.mark.e2e

ISO = "iso"  # 2 agents x 2 slots, egress none
WARM = "wiso"  # 1 agent x 3 slots, egress none, one warm slot of the demo image
OUT = "out"  # 1 agent, egress allow
REMOTE_HOST_IP = "10.213.77.1"
REMOTE_IP = "10.213.77.2"
SERVE = "mkdir -p /www && echo $WHO > /www/index.html && exec httpd -f -p 8080 -h /www"


@pytest.fixture(scope="module")
def server(registry_addr: str) -> Iterator[Server]:
    srv = new_server(registry_addr)
    try:
        srv.start()
        for args in (
            (ISO, "--min", "2", "--max", "2", "--per-agent", "2"),
            (OUT, "--min", "1", "--max", "1", "--egress", "allow"),
        ):
            made = srv.fsb("pool", "create", *args)
            assert made.returncode == 0, made.stderr
        for pool, agents in ((ISO, 2), (OUT, 1)):
            wait_pool_ready(srv, pool, agents)
        yield srv
    finally:
        purge(srv)


def wait_pool_ready(server: Server, pool: str, agents: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = server.fsb("pool", "get", pool, "-o", "json")
        status = json.loads(got.stdout).get("status", {}) if got.returncode == 0 else {}
        if status.get("agents", {}).get("ready", 0) >= agents:
            return
        time.sleep(0.3)
    raise AssertionError(f"pool {pool} not ready")


@dataclass
class Box:
    name: str
    agent: str
    agent_ip: str
    endpoints: list[str]
    container: str
    ip: str


def run_box(server: Server, image: str, name: str, pool: str, *, serve: bool = True) -> Box:
    cmd = ["sh", "-c", SERVE] if serve else ["sleep", "3600"]
    made = server.fsb(
        "run", name, "--image", image, "--pool", pool, "-p", "8080", "-e", f"WHO={name}",
        "--", *cmd,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    status = server.fsb_json("get", name)["status"]
    ip = exec_in(server, name, "ip -4 -o addr show eth0").stdout.split()[3].split("/")[0]
    return Box(
        name, status["assignedAgent"], status["agentIP"], status["endpoints"],
        status["containerID"], ip,
    )  # fmt: skip


def exec_in(server: Server, name: str, script: str) -> subprocess.CompletedProcess[str]:
    return server.fsb("exec", name, "--", "sh", "-c", script, timeout=60)


def connects(server: Server, name: str, host: str, port: int) -> bool:
    """Can sandbox `name` open a TCP connection to host:port (3 s at most)?"""
    result = exec_in(server, name, f"echo x | nc -w 3 {host} {port} >/dev/null")
    return result.returncode == 0


def agent_netns(agent: str) -> str:
    return f"fsb-{agent}"


def host_ip() -> str:
    """An address of the host that is not loopback nor the bridge (eth0's here)."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        dev, addr = line.split()[1], line.split()[3].split("/")[0]
        if dev not in ("lo", "fsb0") and not dev.startswith(("veth", "fsb")):
            return addr
    cannot_run("no host address besides loopback and the bridge")


class Listener:
    """A TCP server on 0.0.0.0 that answers "ok", in this process (the host's namespace)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"ok\n")

    def close(self) -> None:
        self.sock.close()


def netns_listener(netns: str) -> tuple[subprocess.Popen[str], int]:
    """A TCP listener on 0.0.0.0 inside `netns` (python3 in the host's filesystem)."""
    code = (
        "import socket,sys\ns=socket.socket();s.bind(('0.0.0.0',0));s.listen(16)\n"
        "print(s.getsockname()[1],flush=True)\n"
        "while True:\n c,_=s.accept();c.sendall(b'ok\\n');c.close()\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def reachable_from_netns(netns: str, host: str, port: int) -> bool:
    probe = subprocess.run(
        ["ip", "netns", "exec", netns, "busybox", "nc", "-w", "3", host, str(port)],
        input="x\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return probe.returncode == 0 and "ok" in probe.stdout


@pytest.fixture(scope="module")
def boxes(server: Server, demo_image: str) -> Iterator[dict[str, Box]]:
    """Four sandboxes of pool iso, all serving 8080: a1/a2 on one agent, b1/b2 on the other."""
    made: dict[str, Box] = {}
    try:
        for name in ("pn-1", "pn-2", "pn-3", "pn-4"):
            made[name] = run_box(server, demo_image, name, ISO)
        by_agent: dict[str, list[Box]] = {}
        for box in made.values():
            by_agent.setdefault(box.agent, []).append(box)
        assert sorted(len(v) for v in by_agent.values()) == [2, 2], by_agent
        (a1, a2), (b1, b2) = by_agent.values()
        yield {"a1": a1, "a2": a2, "b1": b1, "b2": b2}
    finally:
        for name in made:
            server.fsb("delete", name, "--wait")


def test_two_sandboxes_of_one_agent_both_serve_8080(server: Server, boxes: dict[str, Box]) -> None:
    """Same agent, same declared port: each endpoint is a host port of its own on the agent's
    address, and each reaches its own sandbox (checked from the host, outside any sandbox)."""
    a1, a2 = boxes["a1"], boxes["a2"]
    assert a1.agent == a2.agent
    assert len(a1.endpoints) == len(a2.endpoints) == 1
    assert a1.endpoints != a2.endpoints
    for box in (a1, a2):
        host, port = box.endpoints[0].rsplit(":", 1)
        assert host == box.agent_ip
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        assert reply.decode().rstrip().endswith(box.name), reply


def test_sandboxes_cannot_reach_each_other(server: Server, boxes: dict[str, Box]) -> None:
    a1, a2, b1 = boxes["a1"], boxes["a2"], boxes["b1"]
    # The listeners are there: each sandbox reaches its own server on its own address.
    assert connects(server, a1.name, a1.ip, 8080)
    targets = {
        "same agent, its address": (a2.ip, 8080),
        "same agent, its endpoint": tuple(a2.endpoints[0].rsplit(":", 1)),
        # Its address is not a target: each agent's sandboxes use the same subnet inside the
        # agent's own namespace, so it names a sandbox of a1's own agent (or a1 itself).
        "other agent, its endpoint": tuple(b1.endpoints[0].rsplit(":", 1)),
        "other agent's address": (b1.agent_ip, int(b1.endpoints[0].rsplit(":", 1)[1])),
    }
    for what, (host, port) in targets.items():
        assert not connects(server, a1.name, str(host), int(port)), what


def test_no_host_agent_or_metadata_address(server: Server, boxes: dict[str, Box]) -> None:
    """The host's services (loopback, bridge, its own address), the agent's namespace (where a
    Pod's agent API listens) and 169.254.169.254 are all refused to a sandbox."""
    a1 = boxes["a1"]
    ns = agent_netns(a1.agent)
    host_listener = Listener()
    agent_listener, agent_port = netns_listener(ns)
    # A metadata address the test can listen on: on the agent namespace's loopback.
    subprocess.run(["ip", "-n", ns, "addr", "add", "169.254.169.254/32", "dev", "lo"], check=True)
    try:
        index = int(ctr_label(server, a1.container, plan_labels()[0]))
        gateway = plan.NetConfig(a1.agent, "", a1.agent_ip).addresses(index)[0]
        targets = {
            "host loopback": ("127.0.0.1", host_listener.port),
            "host bridge address": ("10.209.0.1", host_listener.port),
            "host's own address": (host_ip(), host_listener.port),
            "agent namespace, agent IP": (a1.agent_ip, agent_port),
            "agent namespace, veth gateway": (gateway, agent_port),
            "metadata address": ("169.254.169.254", agent_port),
        }
        # Each listener answers where nothing filters: the host's own from the host, the others
        # from the agent's namespace (the path exists; only sandboxes are refused).
        for what, (host, port) in targets.items():
            if what in ("host loopback", "host's own address"):
                socket.create_connection((host, port), timeout=5).close()
            else:
                assert reachable_from_netns(ns, host, port), what
        for what, (host, port) in targets.items():
            assert not connects(server, a1.name, host, port), what
        # The agent's API socket is a file on the host, not in the sandbox.
        state = server.data_dir / "agents" / a1.agent / "agent.sock"
        assert exec_in(server, a1.name, f"test -e {state}").returncode != 0
    finally:
        subprocess.run(["ip", "-n", ns, "addr", "del", "169.254.169.254/32", "dev", "lo"])
        stop(agent_listener)
        host_listener.close()


def plan_labels() -> tuple[str, str]:
    from fastsandbox.api import labels

    return labels.NET_INDEX_LABEL, labels.PUBLISHED_LABEL


def ctr_label(server: Server, container: str, key: str) -> str:
    info = json.loads(server.ctr("containers", "info", container))
    return str(info["Labels"][key])


@pytest.fixture
def remote() -> Iterator[tuple[str, int]]:
    """A "remote" host: a namespace of the test's own behind a veth from the host
    (REMOTE_HOST_IP on the host side), with a listener on REMOTE_IP."""
    name = f"fsbt-remote-{secrets.token_hex(3)}"
    veth = f"fsbtr{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    listener: subprocess.Popen[str] | None = None
    try:
        for argv in (
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name],
            ["ip", "addr", "add", f"{REMOTE_HOST_IP}/30", "dev", veth],
            ["ip", "link", "set", veth, "up"],
            ["ip", "-n", name, "addr", "add", f"{REMOTE_IP}/30", "dev", "eth0"],
            ["ip", "-n", name, "link", "set", "eth0", "up"],
            ["ip", "-n", name, "link", "set", "lo", "up"],
        ):
            subprocess.run(argv, check=True)
        listener, port = netns_listener(name)
        yield name, port
    finally:
        if listener is not None:
            stop(listener)
        subprocess.run(["ip", "link", "delete", veth], capture_output=True)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_egress_none_and_allow(
    server: Server, boxes: dict[str, Box], demo_image: str, remote: tuple[str, int]
) -> None:
    _, port = remote
    host_listener = Listener()
    out = None
    try:
        # The remote answers the host (the route exists).
        with socket.create_connection((REMOTE_IP, port), timeout=5):
            pass
        assert not connects(server, boxes["a1"].name, REMOTE_IP, port), "egress none"
        out = run_box(server, demo_image, "pn-out", OUT, serve=False)
        assert connects(server, out.name, REMOTE_IP, port), "egress allow reaches the remote"
        # ... but still not the host (on any of its addresses), other agents or metadata.
        for what, host in {
            "host address on the remote link": REMOTE_HOST_IP,
            "host bridge address": "10.209.0.1",
            "host's own address": host_ip(),
        }.items():
            assert not connects(server, out.name, host, host_listener.port), what
        b1_host, b1_port = boxes["b1"].endpoints[0].rsplit(":", 1)
        assert not connects(server, out.name, b1_host, int(b1_port)), "another agent"
        assert not connects(server, out.name, "169.254.169.254", 80), "metadata"
    finally:
        host_listener.close()
        if out is not None:
            server.fsb("delete", out.name, "--wait")


def test_delete_leaves_nothing(server: Server, demo_image: str) -> None:
    box = run_box(server, demo_image, "pn-gone", OUT, serve=False)
    index = int(ctr_label(server, box.container, plan_labels()[0]))
    published = ctr_label(server, box.container, plan_labels()[1])
    host_port = published.split(":")[1]
    cfg = plan.NetConfig(box.agent, "", box.agent_ip)
    ns = agent_netns(box.agent)

    def rules() -> str:
        return subprocess.run(
            ["ip", "netns", "exec", ns, "iptables-save"], capture_output=True, text=True
        ).stdout

    assert Path(f"/var/run/netns/{cfg.netns_name(index)}").exists()
    assert (
        cfg.veth_name(index)
        in subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout
    )
    assert box.container in rules() and f"--dport {host_port}" in rules()
    assert server.fsb("delete", box.name, "--wait").returncode == 0
    assert not Path(f"/var/run/netns/{cfg.netns_name(index)}").exists()
    assert (
        cfg.veth_name(index)
        not in subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout
    )
    assert box.container not in rules()
    assert f"--dport {host_port} " not in rules()


@pytest.fixture(scope="module")
def warm_pool(server: Server, demo_image: str) -> str:
    made = server.fsb(
        "pool", "create", WARM, "--min", "1", "--max", "1", "--per-agent", "3",
        "--warm-slots", "1", "--prewarm-image", demo_image,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    wait_pool_ready(server, WARM, 1)
    return WARM


def wait_warm_slot(server: Server, pool: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = server.fsb("pool", "get", pool, "-o", "json")
        status = json.loads(got.stdout).get("status", {}) if got.returncode == 0 else {}
        if any(w.get("ready", 0) for w in status.get("warmSlots", [])):
            return
        time.sleep(0.3)
    raise AssertionError(f"pool {pool}: no warm slot ready")


def run_warm(server: Server, image: str, name: str, pool: str) -> Box:
    """`run_box` on a ready warm slot (a create that found none is deleted and made again);
    `container` is the slot's container id (a claimed slot keeps it; the record names the
    sandbox id)."""
    for _ in range(5):
        wait_warm_slot(server, pool)
        box = run_box(server, image, name, pool)
        timings = server.fsb_json("get", name)["status"].get("timings") or {}
        if timings.get("warm"):
            # The record's containerID is the sandbox id, which the slot's container records.
            every = server.containers()
            listed = [
                c for c in every if c.startswith("w-") and slot_sandbox(server, c) == box.container
            ]
            assert len(listed) == 1, (box.container, {c: slot_sandbox(server, c) for c in every})
            box.container = listed[0]
            return box
        server.fsb("delete", name, "--wait")
    raise AssertionError(f"{name}: no create claimed a warm slot")


def slot_sandbox(server: Server, container: str) -> str:
    """The sandbox id a (claimed) slot's container records."""
    from fastsandbox.api.labels import SANDBOX_ID_LABEL

    info = json.loads(server.ctr("containers", "info", container))
    return str((info.get("Labels") or {}).get(SANDBOX_ID_LABEL, ""))


def test_claimed_slots_have_the_same_isolation(
    server: Server, boxes: dict[str, Box], demo_image: str, warm_pool: str
) -> None:
    made: list[str] = []
    host_listener = Listener()
    try:
        w1 = run_warm(server, demo_image, "pw-1", warm_pool)
        made.append(w1.name)
        w2 = run_warm(server, demo_image, "pw-2", warm_pool)
        made.append(w2.name)
        assert w1.agent == w2.agent and w1.ip != w2.ip
        # A claimed slot keeps its own container id; its network is its own.
        assert w1.container.startswith("w-") and w1.container != w2.container
        # Published like a cold create: each endpoint on the agent's address reaches its own.
        assert w1.endpoints != w2.endpoints
        for box in (w1, w2):
            host, port = box.endpoints[0].rsplit(":", 1)
            assert host == box.agent_ip
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                reply = b""
                while chunk := conn.recv(4096):
                    reply += chunk
            assert reply.decode().rstrip().endswith(box.name), reply
        assert connects(server, w1.name, w1.ip, 8080)  # its own listener is there
        ns = agent_netns(w1.agent)
        agent_listener, agent_port = netns_listener(ns)
        subprocess.run(
            ["ip", "-n", ns, "addr", "add", "169.254.169.254/32", "dev", "lo"], check=True
        )
        try:
            index = int(ctr_label(server, w1.container, plan_labels()[0]))
            gateway = plan.NetConfig(w1.agent, "", w1.agent_ip).addresses(index)[0]
            b1 = boxes["b1"]
            targets = {
                "other claimed slot, its address": (w2.ip, 8080),
                "other claimed slot, its endpoint": tuple(w2.endpoints[0].rsplit(":", 1)),
                "a cold sandbox of another agent, its endpoint": tuple(
                    b1.endpoints[0].rsplit(":", 1)
                ),
                "host loopback": ("127.0.0.1", host_listener.port),
                "host bridge address": ("10.209.0.1", host_listener.port),
                "host's own address": (host_ip(), host_listener.port),
                "agent namespace, agent IP": (w1.agent_ip, agent_port),
                "agent namespace, veth gateway": (gateway, agent_port),
                "metadata address": ("169.254.169.254", agent_port),
            }
            for what in ("agent namespace, agent IP", "metadata address"):
                host, port = targets[what]
                assert reachable_from_netns(ns, str(host), int(port)), what
            for what, (host, port) in targets.items():
                assert not connects(server, w1.name, str(host), int(port)), what
        finally:
            subprocess.run(["ip", "-n", ns, "addr", "del", "169.254.169.254/32", "dev", "lo"])
            stop(agent_listener)
        # A delete leaves nothing of its network.
        cfg = plan.NetConfig(w1.agent, "", w1.agent_ip)
        host_port = ctr_label(server, w1.container, plan_labels()[1]).split(":")[1]
        assert Path(f"/var/run/netns/{cfg.netns_name(index)}").exists()
        assert server.fsb("delete", w1.name, "--wait").returncode == 0
        made.remove(w1.name)
        rules = subprocess.run(
            ["ip", "netns", "exec", ns, "iptables-save"], capture_output=True, text=True
        ).stdout
        assert f"fsb:{w1.name}:" not in rules and f"--dport {host_port} " not in rules
        links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True)
        assert f"{cfg.veth_name(index)}@" not in links.stdout
        # The fault suite's leak check, with each agent's sandbox namespaces: nothing leaked.
        found: dict[str, list[str]] = {}
        for _ in range(30):  # settled: a delete's last steps follow its reply
            found = leaks(inventory(server, (warm_pool,), sandbox_netns=True))
            if not found:
                break
            time.sleep(0.5)
        assert not found, found
    finally:
        host_listener.close()
        for name in made:
            server.fsb("delete", name, "--wait")
