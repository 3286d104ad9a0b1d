"""Private networks in the Kubernetes shape (issue 10 item 1): the *default* pool (no
`networkMode` given: private) works with agents in Pods, and its sandboxes are isolated as in
the embedded shape (tests/e2e/test_private_network.py, whose helpers this reuses).

The process kubelet runs each agent Pod in a network namespace of its own (tests/k8s_podnet.py)
with exactly the capabilities its manifest asks for (drop ALL, add NET_ADMIN + NET_RAW), so the
agent sets its rules in its Pod's namespace only. The sandboxes' namespaces are made by the test
containerd's runc, wired by the network hook (agent/network/hook.py) running on the host.
Nothing here sets a filter or NAT rule in the host's namespace.

Every test runs twice: on the default pool (runc) and on a gVisor pool (`runtime: gvisor`,
private). Under runsc the sandbox's namespace is made by runsc itself (the spec's `network` entry
has no path) and wired by the same hook, which runsc runs as a createRuntime hook with its
sandbox process's pid; the Sentry's `--network=host` is that namespace. The agent Pod of the
gVisor pool keeps exactly the same two capabilities.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastsandbox.agent.network import plan
from tests.e2e._kube_server import DEFAULT_POOL, KubeServer, purge_kube
from tests.e2e.conftest import start_kube_server
from tests.e2e.test_private_network import (
    Box,
    Listener,
    connects,
    ctr_label,
    exec_in,
    host_ip,
    netns_listener,
    plan_labels,
    reachable_from_netns,
    run_box,
    stop,
    wait_pool_ready,
)
from tests.infra import cannot_run, missing_requirements
from tests.k8s_podnet import SUBNET, PodNet

pytestmark = [pytest.mark.e2e, pytest.mark.kubernetes]

AGENT_PORT = 7443
# CapEff of the agent Pod's process: CAP_NET_ADMIN (12) and CAP_NET_RAW (13), nothing else.
NET_ADMIN_RAW = (1 << 12) | (1 << 13)


GVISOR_POOL = "kpn-gvisor"


@pytest.fixture(scope="module")
def kube(request: pytest.FixtureRequest) -> Iterator[KubeServer]:
    srv = start_kube_server(request, replicas=1, pod_network=True)
    srv.pool_args = ()  # the pools' defaults: networkMode private
    try:
        wait_pool_ready(srv, DEFAULT_POOL, 1)  # type: ignore[arg-type]
        yield srv
    finally:
        purge_kube(srv)


@pytest.fixture(scope="module", params=["runc", "gvisor"])
def pool(request: pytest.FixtureRequest, kube: KubeServer) -> str:
    """The pool the module's sandboxes run in: the default (runc) one, or a gVisor one."""
    if request.param == "runc":
        return DEFAULT_POOL
    if (why := missing_requirements(gvisor=True)) is not None:
        cannot_run(why)
    made = kube.fsb(
        "pool", "create", GVISOR_POOL, "--runtime", "gvisor", "--min", "1", "--max", "1",
        "--per-agent", "3",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    wait_pool_ready(kube, GVISOR_POOL, 1)  # type: ignore[arg-type]
    return GVISOR_POOL


def pod_net(agent_ip: str) -> PodNet:
    """The agent Pod's namespace, from its Pod IP (tests/k8s_podnet.py's layout)."""
    offset = int(ipaddress.ip_address(agent_ip)) - int(SUBNET.network_address)
    assert offset % 2 == 1, agent_ip
    return PodNet(offset // 2)


@pytest.fixture(scope="module")
def boxes(kube: KubeServer, demo_image: str, pool: str) -> Iterator[tuple[Box, Box]]:
    made: list[Box] = []
    prefix = "kpn" if pool == DEFAULT_POOL else "kpg"
    try:
        for name in (f"{prefix}-1", f"{prefix}-2"):
            made.append(run_box(kube, demo_image, name, pool))  # type: ignore[arg-type]
        yield made[0], made[1]
    finally:
        for box in made:
            kube.fsb("delete", box.name, "--wait")


def test_the_agent_pod_keeps_only_net_admin_and_net_raw(
    kube: KubeServer, boxes: tuple[Box, Box]
) -> None:
    a1, _ = boxes
    status = Path(f"/proc/{kube.agent_pid(a1.agent)}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["CapEff"], 16) == NET_ADMIN_RAW, fields["CapEff"]
    assert int(fields["CapBnd"], 16) == NET_ADMIN_RAW, fields["CapBnd"]
    assert fields["NoNewPrivs"].strip() == "1"
    # ... and runs in its Pod's namespace, not the host's.
    agent_ns = Path(f"/proc/{kube.agent_pid(a1.agent)}/ns/net").stat().st_ino
    assert agent_ns == Path(pod_net(a1.agent_ip).path).stat().st_ino
    assert agent_ns != Path("/proc/self/ns/net").stat().st_ino


def test_two_sandboxes_of_one_agent_both_serve_8080(boxes: tuple[Box, Box]) -> None:
    a1, a2 = boxes
    assert a1.agent == a2.agent and a1.ip != a2.ip
    assert len(a1.endpoints) == len(a2.endpoints) == 1 and a1.endpoints != a2.endpoints
    for box in boxes:
        host, port = box.endpoints[0].rsplit(":", 1)
        assert host == box.agent_ip  # the Pod IP
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        assert reply.decode().rstrip().endswith(box.name), reply


def test_no_other_sandbox_agent_api_host_or_metadata(
    kube: KubeServer, boxes: tuple[Box, Box]
) -> None:
    a1, a2 = boxes
    net = pod_net(a1.agent_ip)
    assert connects(kube, a1.name, a1.ip, 8080)  # its own server: the listener is there
    # The agent's API answers from outside (the controller's path).
    socket.create_connection((a1.agent_ip, AGENT_PORT), timeout=5).close()
    host_listener = Listener()
    pod_listener, pod_port = netns_listener(net.netns)
    subprocess.run(
        ["ip", "-n", net.netns, "addr", "add", "169.254.169.254/32", "dev", "lo"], check=True
    )
    try:
        index = int(ctr_label(kube, a1.container, plan_labels()[0]))  # type: ignore[arg-type]
        gateway = plan.NetConfig(a1.agent, "", a1.agent_ip).addresses(index)[0]
        in_pod = {
            "agent Pod IP, another port": (a1.agent_ip, pod_port),
            "veth gateway in the Pod": (gateway, pod_port),
            "metadata address": ("169.254.169.254", pod_port),
            "node, its end of the Pod link": (net.host_ip, host_listener.port),
            "node's own address": (host_ip(), host_listener.port),
        }
        for what, (host, port) in in_pod.items():
            assert reachable_from_netns(net.netns, host, port), what
        targets = {
            **in_pod,
            "agent API": (a1.agent_ip, AGENT_PORT),
            "other sandbox, its address": (a2.ip, 8080),
            "other sandbox, its endpoint": tuple(a2.endpoints[0].rsplit(":", 1)),
        }
        for what, (host, port) in targets.items():
            assert not connects(kube, a1.name, str(host), int(port)), what
    finally:
        subprocess.run(["ip", "-n", net.netns, "addr", "del", "169.254.169.254/32", "dev", "lo"])
        stop(pod_listener)
        host_listener.close()


def test_exec_runs_under_the_pools_runtime_seeing_lo_and_eth0(
    kube: KubeServer, boxes: tuple[Box, Box], pool: str
) -> None:
    """Exec works; a gVisor pool's sandbox runs on the Sentry (its dmesg says so: the host's
    runc sandbox may not read the host's), and sees only its loopback and eth0."""
    a1, _ = boxes
    if pool == GVISOR_POOL:
        dmesg = exec_in(kube, a1.name, "dmesg")  # type: ignore[arg-type]
        assert dmesg.returncode == 0 and "gVisor" in dmesg.stdout, dmesg.stdout[:300]
    links = exec_in(kube, a1.name, "cat /proc/net/dev")  # type: ignore[arg-type]
    names = {ln.split(":")[0].strip() for ln in links.stdout.splitlines()[2:] if ":" in ln}
    assert names == {"lo", "eth0"}, links.stdout


def test_delete_leaves_nothing(kube: KubeServer, demo_image: str, pool: str) -> None:
    name = "kpn-gone" if pool == DEFAULT_POOL else "kpg-gone"
    box = run_box(kube, demo_image, name, pool, serve=False)  # type: ignore[arg-type]
    index = int(ctr_label(kube, box.container, plan_labels()[0]))  # type: ignore[arg-type]
    published = ctr_label(kube, box.container, plan_labels()[1])  # type: ignore[arg-type]
    host_port = published.split(":")[1]
    veth = plan.NetConfig(box.agent, "", box.agent_ip).veth_name(index)
    net = pod_net(box.agent_ip)

    def links() -> str:
        return subprocess.run(
            ["ip", "-n", net.netns, "-o", "link"], capture_output=True, text=True
        ).stdout

    def rules() -> str:
        return subprocess.run(
            ["ip", "netns", "exec", net.netns, "iptables-save"], capture_output=True, text=True
        ).stdout

    namespaces_before = set(Path("/var/run/netns").iterdir())
    assert veth in links()
    assert box.container in rules() and f"--dport {host_port}" in rules()
    assert kube.fsb("delete", box.name, "--wait").returncode == 0
    # The kernel tears a dead namespace down in the background: its veth goes shortly after.
    deadline = time.monotonic() + 30
    while veth in links() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert veth not in links()
    assert box.container not in rules() and f"--dport {host_port} " not in rules()
    # The agent never made a named namespace: runc's went with the container.
    assert set(Path("/var/run/netns").iterdir()) <= namespaces_before


def loop_images(needle: str) -> list[Path]:
    """Backing files of the host's loop devices whose path contains `needle`."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            path = backing.read_text().strip()
            if needle in path:
                found.append(Path(path))
    return found


def test_the_disk_limit_holds_in_an_agent_pod(
    kube: KubeServer, boxes: tuple[Box, Box], demo_image: str
) -> None:
    """`fsb run --disk 8Mi` in an agent Pod that cannot mount (no CAP_SYS_ADMIN, checked above):
    writing 24 MiB fails inside with ENOSPC, `df /` shows the limit, the sandbox keeps running,
    a neighbour with the default limit writes the same; the loop device is the shim's, and
    delete leaves no loop device, mount or image file."""
    fill = "dd if=/dev/zero of=/fill bs=1M count=24 2>&1; echo dd-exit=$?"
    made = kube.fsb(
        "run", "kpn-disk", "--image", demo_image, "--pool", DEFAULT_POOL, "--disk", "8Mi",
        "--", "sleep", "600",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    container = kube.fsb_json("get", "kpn-disk")["status"]["containerID"]
    try:
        images = loop_images(container)
        assert len(images) == 1 and images[0].is_file(), images  # attached by the node's shim
        small = exec_in(kube, "kpn-disk", fill)  # type: ignore[arg-type]
        assert "No space left on device" in small.stdout and "dd-exit=1" in small.stdout, small
        again = exec_in(kube, "kpn-disk", "df -k / | tail -1; echo up")  # type: ignore[arg-type]
        assert again.returncode == 0 and "up" in again.stdout, again
        assert int(again.stdout.split()[1]) <= 8 * 1024, again.stdout
        big = exec_in(kube, boxes[1].name, fill + "; rm -f /fill")  # type: ignore[arg-type]
        assert "dd-exit=0" in big.stdout, big
        assert kube.fsb_json("get", "kpn-disk")["status"]["phase"] == "Running"
    finally:
        assert kube.fsb("delete", "kpn-disk", "--wait").returncode == 0
    assert not loop_images(container)
    assert not images[0].exists()
    assert container not in Path("/proc/self/mountinfo").read_text()


OUT_POOL = "kpn-out"  # egress allow
REMOTE_PREFIX = "10.215.77."  # link i: the Pod's end .(4i+1)/30, the remote's .(4i+2)/30


@contextlib.contextmanager
def remote_linked_to(*nets: PodNet) -> Iterator[tuple[list[str], int]]:
    """A "remote" host: a namespace of the test's own with a veth into each Pod namespace in
    `nets` (its own /30 each; the Pod's namespace gets the route with the address) and one
    listener. Yields the remote's address on each link, and the port."""
    name = f"fsbt-kremote-{secrets.token_hex(3)}"
    veths = [f"fsbtk{secrets.token_hex(2)}" for _ in nets]
    subprocess.run(["ip", "netns", "add", name], check=True)
    listener: subprocess.Popen[str] | None = None
    try:
        addresses = []
        for i, (net, veth) in enumerate(zip(nets, veths, strict=True)):
            pod_end, remote_end = f"{REMOTE_PREFIX}{4 * i + 1}", f"{REMOTE_PREFIX}{4 * i + 2}"
            for argv in (
                ["ip", "-n", net.netns, "link", "add", veth, "type", "veth", "peer", "name",
                 f"r{i}", "netns", name],
                ["ip", "-n", net.netns, "addr", "add", f"{pod_end}/30", "dev", veth],
                ["ip", "-n", net.netns, "link", "set", veth, "up"],
                ["ip", "-n", name, "addr", "add", f"{remote_end}/30", "dev", f"r{i}"],
                ["ip", "-n", name, "link", "set", f"r{i}", "up"],
            ):  # fmt: skip
                subprocess.run(argv, check=True)
            addresses.append(remote_end)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        listener, port = netns_listener(name)
        yield addresses, port
    finally:
        if listener is not None:
            stop(listener)
        for net, veth in zip(nets, veths, strict=True):
            subprocess.run(["ip", "-n", net.netns, "link", "delete", veth], capture_output=True)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


@contextlib.contextmanager
def pods_linked(a: PodNet, b: PodNet) -> Iterator[None]:
    """A direct veth between two Pod namespaces with a /32 route to each other's Pod IP, so
    one Pod reaches the other as on a real Pod network (the test tier's Pods do not route to
    each other: that would need forwarding on the host)."""
    va, vb = f"fsbtp{secrets.token_hex(2)}", f"fsbtp{secrets.token_hex(2)}"
    try:
        for argv in (
            ["ip", "-n", a.netns, "link", "add", va, "type", "veth", "peer", "name", vb,
             "netns", b.netns],
            ["ip", "-n", a.netns, "link", "set", va, "up"],
            ["ip", "-n", b.netns, "link", "set", vb, "up"],
            ["ip", "-n", a.netns, "route", "add", f"{b.ip}/32", "dev", va],
            ["ip", "-n", b.netns, "route", "add", f"{a.ip}/32", "dev", vb],
        ):  # fmt: skip
            subprocess.run(argv, check=True)
        yield
    finally:
        subprocess.run(["ip", "-n", a.netns, "link", "delete", va], capture_output=True)


def test_egress_none_reaches_nothing_allow_reaches_the_remote_but_no_other_agent_pod(
    kube: KubeServer, boxes: tuple[Box, Box], demo_image: str
) -> None:
    a1, _ = boxes
    made = kube.fsb("pool", "create", OUT_POOL, "--min", "1", "--max", "1", "--egress", "allow")
    assert made.returncode == 0, made.stderr
    out: Box | None = None
    try:
        wait_pool_ready(kube, OUT_POOL, 1)  # type: ignore[arg-type]
        out = run_box(kube, demo_image, "kpn-out-1", OUT_POOL, serve=False)  # type: ignore[arg-type]
        assert out.agent != a1.agent
        none_net, out_net = pod_net(a1.agent_ip), pod_net(out.agent_ip)
        with (
            remote_linked_to(none_net, out_net) as (remotes, port),
            pods_linked(none_net, out_net),
        ):
            # Each Pod's namespace reaches the remote and the other Pod's agent API and
            # sandbox endpoint: the routes are there.
            assert reachable_from_netns(none_net.netns, remotes[0], port)
            assert reachable_from_netns(out_net.netns, remotes[1], port)
            a1_host, a1_port = a1.endpoints[0].rsplit(":", 1)
            for what, (host, p) in {
                "other agent Pod's API": (a1.agent_ip, AGENT_PORT),
                "its sandbox's endpoint": (a1_host, int(a1_port)),
            }.items():
                # A TLS server and a plain one: a TCP connect is the question.
                probe = subprocess.run(
                    ["ip", "netns", "exec", out_net.netns, sys.executable, "-c",
                     f"import socket; socket.create_connection(({host!r}, {p}), 5)"],
                    capture_output=True, timeout=30,
                )  # fmt: skip
                assert probe.returncode == 0, (what, probe.stderr)
            assert not connects(kube, a1.name, remotes[0], port), "egress none"
            assert connects(kube, out.name, remotes[1], port), "egress allow: the remote"
            for what, (host, p) in {
                "other agent Pod's API": (a1.agent_ip, AGENT_PORT),
                "its sandbox's endpoint": (a1_host, int(a1_port)),
                "its sandbox's address": (a1.ip, 8080),
                "own agent's API": (out.agent_ip, AGENT_PORT),
                "metadata": ("169.254.169.254", 80),
            }.items():
                assert not connects(kube, out.name, str(host), int(p)), what
    finally:
        if out is not None:
            kube.fsb("delete", out.name, "--wait")
        kube.fsb("pool", "delete", OUT_POOL)
