"""Warm slots through the real agent process, real containerd, runc and the real supervisor.

- A claimed slot is indistinguishable from a cold sandbox to the user's code: the same probe, as
  the main process of both, sees the same hostname (its sandbox id), env, cwd, user and groups,
  capabilities, rlimits, cgroup, mounts, open descriptors, processes and an empty /tmp (modulo
  ids); and the host sees the same cgroup limits. Under runc, under gVisor, and with the agent
  run as an agent Pod runs it (uid 0 with every capability dropped and no_new_privs, as
  fleet/kubernetes_manifest.py's securityContext): a claim needs nothing of the agent's own.
- Claim and refill; capacity: slots fill only free capacity, a create of another image retires
  one, the agent never holds more than its capacity; exec and logs work in a claimed sandbox.
- kill -9 of the agent: the claimed sandbox is adopted (by its sandbox id, exec works), the old
  slot is removed and a fresh one made; nothing is left behind.
- A private pool (`--network-mode=private`, an agent namespace of the test's own): the probe also
  compares the network view (interfaces, addresses and routes modulo the sandbox's own /31,
  IPv6 off, sockets, /etc/hosts, resolv.conf); each slot has a namespace of its own, the claim
  publishes the request's port (DNAT, the published label); after a kill -9 exactly the
  namespaces, veths and DNAT rules of what lives are left, and after the deletes none.
Bounds below only stop a hung test; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fastsandbox.agent.network import plan
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2, agent_pb2_grpc
from fastsandbox.api.images import normalize_image_ref
from fastsandbox.api.labels import (
    AGENT_LABEL,
    NET_INDEX_LABEL,
    PUBLISHED_LABEL,
    SANDBOX_ID_LABEL,
    WARM_SLOT_LABEL,
)
from tests.infra import ContainerdProc, RegistryProc
from tests.integration.test_agent_exec import run, runsc_works, supervisor_binary
from tests.integration.test_agent_process import AgentProc

pytestmark = pytest.mark.integration

BOUND = 60.0
CAPACITY = 3
# A log cap other than the agent's default: a slot (made with the default) cannot serve it, so
# such a create is cold by construction.
COLD_LOG_CAP = 2 << 20

PROBE = r"""
echo "== hostname"; hostname; cat /proc/sys/kernel/hostname
echo "== id"; id
echo "== cwd"; pwd; stat -c '%U %G %a' .
echo "== env"; env | sort
echo "== umask"; umask
echo "== status"
grep -E '^(Uid|Gid|Groups|Cap...|NoNewPrivs|Seccomp)' /proc/$$/status
echo "== limits"; cat /proc/$$/limits
echo "== cgroup"; cat /proc/$$/cgroup
echo "== sys cgroup"; ls /sys/fs/cgroup 2>&1
echo "== mounts"; cat /proc/$$/mounts
echo "== fds"; for f in /proc/$$/fd/*; do echo "${f##*/} $(readlink "$f")"; done
echo "== processes"
# Distinct command lines: the loop's own subshells (forks of this script) come and go with
# timing; a process either sandbox has and the other has not still shows.
for p in /proc/[0-9]*; do tr '\0' ' ' < "$p/cmdline" 2>/dev/null; echo; done | sort -u
echo "== tmp"; ls -A /tmp
"""
NET_PROBE = r"""
echo "== net links"; ip -o link
echo "== net addrs"; ip -o addr
echo "== net routes"; ip route; ip rule 2>&1
echo "== net ipv6"; cat /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/net/if_inet6 2>&1
echo "== net sockets"; cat /proc/net/tcp /proc/net/udp
echo "== hosts"; cat /etc/hosts 2>&1
echo "== resolv"; cat /etc/resolv.conf 2>&1
"""
PROBE_END = """
echo "== end"
exec sleep 3600
"""
PORT = 8080


@dataclass
class AgentNet:
    """The agent's own network namespace (as the fleet's CNI gives one): a veth from the host,
    the agent's address on its far end."""

    name: str
    agent_ip: str
    host_veth: str

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"


@pytest.fixture
def agent_net() -> Iterator[AgentNet]:
    tag = secrets.token_hex(3)
    octet = int(tag[:2], 16)
    net = AgentNet(f"fsbt-wn-{tag}", f"10.215.{octet}.2", f"fsbtw{tag}")
    subprocess.run(["ip", "netns", "add", net.name], check=True)
    try:
        for argv in (
            ["ip", "link", "add", net.host_veth, "type", "veth", "peer", "name", "eth0",
             "netns", net.name],
            ["ip", "addr", "add", f"10.215.{octet}.1/30", "dev", net.host_veth],
            ["ip", "link", "set", net.host_veth, "up"],
            ["ip", "-n", net.name, "addr", "add", f"{net.agent_ip}/30", "dev", "eth0"],
            ["ip", "-n", net.name, "link", "set", "eth0", "up"],
            ["ip", "-n", net.name, "link", "set", "lo", "up"],
        ):  # fmt: skip
            subprocess.run(argv, check=True, capture_output=True)
        yield net
    finally:
        subprocess.run(["ip", "link", "delete", net.host_veth], capture_output=True)
        subprocess.run(["ip", "netns", "delete", net.name], capture_output=True)


# An agent Pod's process: root, every capability gone (bounding set too), no_new_privs.
AS_A_POD = [
    "setpriv", "--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
    "--",
]  # fmt: skip


@pytest.fixture
def variant(request: pytest.FixtureRequest) -> str:
    """How the agent runs: "runc" (on the host, as root), "gvisor", or "pod" (runc, the agent
    with no capabilities)."""
    name = str(getattr(request, "param", "runc"))
    if name == "gvisor" and (why := runsc_works()):
        pytest.fail(why)  # a tier that cannot run here fails, never skips
    return name


@pytest.fixture
async def agent(
    request: pytest.FixtureRequest,
    containerd: ContainerdProc,
    registry: RegistryProc,
    cgroup_parent: str,
    tmp_path: Path,
    demo_image: str,
    variant: str,
) -> AsyncIterator[AgentProc]:
    """The agent, in a shared network (the default) or, parametrized `private`, in a private
    one on an `agent_net` of its own."""
    private = getattr(request, "param", "shared") == "private"
    net: AgentNet | None = request.getfixturevalue("agent_net") if private else None
    init = supervisor_binary()
    name = f"it-warm-{uuid.uuid4().hex[:8]}"
    sock_dir = Path(f"/tmp/fsb-warm-{uuid.uuid4().hex[:8]}")
    sock_dir.mkdir()
    socket = sock_dir / "agent.sock"
    state_dir = tmp_path / "state"
    argv = [
        sys.executable, "-m", "fastsandbox.agent", f"--name={name}", "--pool=it-pool",
        f"--listen=unix://{socket}", f"--state-dir={state_dir}",
        f"--containerd-socket={containerd.socket}", f"--cgroup-parent={cgroup_parent}",
        f"--insecure-registry={registry.addr}", f"--capacity={CAPACITY}", "--grace=1",
        f"--init-path={init}", "--log-format=json",
        "--warm-slots=1", f"--warm-image={demo_image}",
        # gVisor keeps slots per image and limits: the probe's limits become hot once served.
        f"--warm-recent={1 if variant == 'gvisor' else 0}",
        f"--runtime={'gvisor' if variant == 'gvisor' else 'runc'}",
    ]  # fmt: skip
    if variant == "pod":
        argv = [*AS_A_POD, *argv]
    if net is not None:
        argv += [
            "--network-mode=private", f"--netns-path={net.path}", f"--agent-ip={net.agent_ip}",
        ]  # fmt: skip
    proc = AgentProc(argv, f"unix://{socket}", socket, state_dir, tmp_path / "agent.log")
    try:
        yield proc
    finally:
        proc.kill()
        runtime = ContainerdRuntime(
            containerd.socket, "fastsandbox", [registry.addr], state_dir=state_dir / "runtime"
        )
        try:
            for state in await runtime.list({AGENT_LABEL: name}):
                await runtime.delete(state.id, 0)
        finally:
            await runtime.close()
            for p in sock_dir.iterdir():
                p.unlink()
            sock_dir.rmdir()
            delete_netns(sandbox_netns(name))  # the agent's own (its tag); agent_net's is its


def delete_netns(names: set[str]) -> None:
    for ns in names:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def sandbox_netns(agent: str) -> set[str]:
    """This agent's per-sandbox namespaces (named by its tag), as the host has them."""
    tag = plan.agent_tag(agent)
    return {
        p.name for p in Path("/var/run/netns").glob(f"{plan.NETNS_PREFIX}{tag}-*")
        if plan.parse_index(p.name, tag) is not None
    }  # fmt: skip


def agent_name(agent: AgentProc) -> str:
    return next(a.split("=", 1)[1] for a in agent.argv if a.startswith("--name="))


async def warm_ready(stub: agent_pb2_grpc.AgentAsyncStub) -> dict[str, int]:
    status = await stub.Status(agent_pb2.StatusRequest(), timeout=BOUND)
    return {w.image: w.ready for w in status.warm_slots}


async def wait_ready(stub: agent_pb2_grpc.AgentAsyncStub, image: str, n: int = 1) -> None:
    deadline = time.monotonic() + BOUND
    while (await warm_ready(stub)).get(image, 0) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"no warm slot of {image} became ready")
        await asyncio.sleep(0.05)


async def create(
    stub: agent_pb2_grpc.AgentAsyncStub,
    sid: str,
    image: str,
    *,
    log_cap: int = 0,
    net: bool = False,
) -> agent_pb2.SandboxState:
    """The probe as the sandbox's main process; `net`: with the network view, and port 8080
    declared."""
    probe = PROBE + (NET_PROBE if net else "") + PROBE_END
    spec = agent_pb2.SandboxRuntimeSpec(
        sandbox_id=sid,
        namespace="default",
        name=sid,
        image=image,
        command=["sh", "-c", probe],
        exposed_ports=[PORT] if net else [],
        working_dir="/srv/app",
        env=[agent_pb2.KeyValue(key="V", value="world")],
        cpu_millis=500,
        memory_bytes=256 << 20,
        pids_limit=100,
        log_max_bytes=log_cap,
    )
    created = await stub.CreateSandbox(agent_pb2.CreateSandboxRequest(spec=spec), timeout=BOUND)
    return created.sandbox


async def probe_output(stub: agent_pb2_grpc.AgentAsyncStub, sid: str) -> str:
    deadline = time.monotonic() + BOUND
    while True:
        call = stub.Logs(agent_pb2.SandboxLogsRequest(sandbox_id=sid), timeout=BOUND)
        text = b"".join([m.data async for m in call if m.stream == "stdout"]).decode()
        # A line of its own: the probe's text (in its own cmdline, listed under processes)
        # holds `echo "== end"` too, which a slower runtime (gVisor) shows before the end.
        if "\n== end\n" in text:
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"probe of {sid} did not finish: {text!r}")
        await asyncio.sleep(0.05)


async def container_of(containerd: ContainerdProc, sid: str) -> str:
    """The container of sandbox `sid` as containerd itself records it: a claimed slot's record
    is written just after the create is answered (runtime/claim_records.py), so it is waited
    for (bounded)."""
    runtime = ContainerdRuntime(containerd.socket, "fastsandbox")
    deadline = time.monotonic() + BOUND
    try:
        while not (states := await runtime.list({SANDBOX_ID_LABEL: sid})):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
    finally:
        await runtime.close()
    assert len(states) == 1, states
    return states[0].id


def normalized(text: str, ids: dict[str, str]) -> str:
    for real, alias in ids.items():
        text = text.replace(real, alias)
    # Inode numbers: the kernel's for pipes and sockets, and gVisor's own for host-backed
    # descriptors (`host:[N]`, numbered in the order the Sentry imported them).
    text = re.sub(r"(pipe|socket|anon_inode|host):\[\d+\]", r"\1:[N]", text)
    # The network view: the peer's ifindex and the MAC are per veth.
    text = re.sub(r"@if\d+", "@ifN", text)
    text = re.sub(r"link/ether [0-9a-f:]{17} brd", "link/ether MAC brd", text)
    return re.sub(r"/snapshots/\d+/", "/snapshots/N/", text)


def labels_of(state: agent_pb2.SandboxState) -> dict[str, str]:
    return {kv.key: kv.value for kv in state.labels}


def net_normalized(text: str, agent: str, state: agent_pb2.SandboxState) -> str:
    """The sandbox's own /31 (its index label's) as <IP> and <GW>."""
    index = int(labels_of(state)[NET_INDEX_LABEL])
    gateway, ip = plan.NetConfig(agent, "", "").addresses(index)
    for real, alias in ((ip, "<IP>"), (gateway, "<GW>")):
        text = re.sub(rf"(?<![\d.]){re.escape(real)}(?![\d.])", alias, text)
    return text


def agent_rules(net: AgentNet) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", net.name, "iptables-save"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def dnat_comments(net: AgentNet) -> set[str]:
    """The `fsb:<sandbox>:<port>` comments of the DNAT rules in the agent's namespace."""
    return set(re.findall(r'--comment "?(fsb:[^" ]+)', agent_rules(net)))


def agent_veths(net: AgentNet, agent: str) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", net.name, "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    prefix = f"{plan.VETH_PREFIX}{plan.agent_tag(agent)}"
    return {m for m in re.findall(r"^\d+: ([^:@]+)", out, re.M) if m.startswith(prefix)}


def host_limits(cgroup_parent: str, agent: str, cid: str) -> dict[str, str]:
    root = Path("/sys/fs/cgroup")
    rel = f"{cgroup_parent.strip('/')}/{agent}/{cid}"
    files = {
        "memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
        "cpu": ("cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us"),
        "pids": ("pids.max",),
    }
    out: dict[str, str] = {}
    if (root / "cgroup.controllers").exists():  # v2
        for name in ("memory.max", "memory.swap.max", "cpu.max", "cpu.weight", "pids.max"):
            path = root / rel / name
            if path.exists():
                out[name] = path.read_text().strip()
        return out
    for controller, names in files.items():
        for name in names:
            path = root / controller / rel / name
            if path.exists():
                out[name] = path.read_text().strip()
    return out


@pytest.mark.parametrize(
    ("agent", "variant"),
    [("shared", "runc"), ("private", "runc"), ("shared", "pod"), ("shared", "gvisor")],
    indirect=True,
)
async def test_a_claimed_slot_is_indistinguishable_from_a_cold_sandbox(
    agent: AgentProc,
    demo_image: str,
    containerd: ContainerdProc,
    cgroup_parent: str,
    request: pytest.FixtureRequest,
    variant: str,
) -> None:
    image = normalize_image_ref(demo_image)
    private = "--network-mode=private" in agent.argv
    name = agent_name(agent)
    agent.start()
    await agent.ready()
    async with agent.stub() as stub:
        if variant == "pod":
            # The agent really runs without capabilities (what it may do decides the test).
            assert agent.proc is not None
            caps = Path(f"/proc/{agent.proc.pid}/status").read_text()
            assert "CapEff:\t0000000000000000" in caps and "CapBnd:\t0000000000000000" in caps
        await wait_ready(stub, image)
        if variant == "gvisor":
            # A slot of the default limits cannot serve the probe's: one create of its limits
            # makes that kind hot, and its slot is made in the background.
            seed = await create(stub, "it-probe-seed", demo_image)
            assert not seed.warm
            await stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id="it-probe-seed"))
            await wait_ready(stub, image, 2)
        slot_before = await containers(containerd, name)
        warm_sid, cold_sid = "it-probe-warm", "it-probe-cold"
        warm = await create(stub, warm_sid, demo_image, net=private)
        cold = await create(stub, cold_sid, demo_image, log_cap=COLD_LOG_CAP, net=private)
        assert (warm.warm, cold.warm) == (True, False)
        assert warm.sandbox_id == warm.container_id == warm_sid
        warm_cid = await container_of(containerd, warm_sid)
        assert warm_cid != warm_sid and warm_cid.startswith("w-")
        assert await container_of(containerd, cold_sid) == cold_sid
        raw_warm = await probe_output(stub, warm_sid)
        raw_cold = await probe_output(stub, cold_sid)
        # The hostname is the sandbox id in both (the container id never shows there).
        assert f"== hostname\n{warm_sid}\n{warm_sid}\n" in raw_warm
        assert f"== hostname\n{cold_sid}\n{cold_sid}\n" in raw_cold
        # Modulo ids: the cgroup path holds the container's (the slot's for a claimed one).
        seen_warm = normalized(raw_warm, {warm_cid: "<ID>", warm_sid: "<ID>"})
        seen_cold = normalized(raw_cold, {cold_sid: "<ID>"})
        # Sanity: the probe saw what the spec asked for, so equality means something.
        assert "V=world" in seen_cold and "/srv/app\nroot root 755" in seen_cold
        assert "== tmp\n== " in seen_cold and "/.fsb/init \n" in seen_cold
        if private:
            net: AgentNet = request.getfixturevalue("agent_net")
            seen_warm = net_normalized(seen_warm, name, warm)
            seen_cold = net_normalized(seen_cold, name, cold)
            # Sanity: its own /31 and nothing of the agent's or the host's network.
            assert "inet <IP>/31" in seen_cold and "default via <GW> dev eth0" in seen_cold
            assert "== net ipv6\n1\n" in seen_cold, seen_cold
            assert net.agent_ip not in seen_cold and "10.215." not in seen_cold
            await check_private_claim(net, name, slot_before, warm, cold, warm_cid)
        assert seen_warm == seen_cold
        cold_limits = host_limits(cgroup_parent, name, cold_sid)
        assert cold_limits and "pids.max" in cold_limits, cold_limits
        assert host_limits(cgroup_parent, name, warm_cid) == cold_limits
        # Exec in the claimed sandbox inherits the sandbox's env and cwd, as in a cold one.
        for sid in (warm_sid, cold_sid):
            r = await run(stub, sid, ["sh", "-c", 'echo "$V $(pwd) $(hostname)"'])
            assert r.stdout.decode() == f"world /srv/app {sid}\n", r.stderr
        # Deleting the claimed one leaves nothing of its container behind.
        await stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id=warm_sid))
        assert_gone(agent, warm_cid)
        assert warm_cid not in await containers(containerd, name)
        if private:
            assert f"fsb:{warm_sid}:{PORT}" not in dnat_comments(net)
            assert index_netns(name, warm) not in sandbox_netns(name)


def index_netns(agent: str, state: agent_pb2.SandboxState) -> str:
    return plan.NetConfig(agent, "", "").netns_name(int(labels_of(state)[NET_INDEX_LABEL]))


async def check_private_claim(
    net: AgentNet,
    agent: str,
    slot_before: dict[str, dict[str, str]],
    warm: agent_pb2.SandboxState,
    cold: agent_pb2.SandboxState,
    warm_cid: str,
) -> None:
    """The claimed slot brought the namespace it was made with; the claim published its port
    and recorded it as a cold create does; each sandbox has a namespace and host port of its
    own."""
    assert NET_INDEX_LABEL in slot_before[warm_cid]  # the slot had its namespace before
    assert labels_of(warm)[NET_INDEX_LABEL] == slot_before[warm_cid][NET_INDEX_LABEL]
    ports = []
    for state in (warm, cold):
        published = plan.parse_published_label(labels_of(state)[PUBLISHED_LABEL])
        assert list(published) == [PORT], published
        ports.append(published[PORT])
        assert index_netns(agent, state) in sandbox_netns(agent)
    assert ports[0] != ports[1]
    assert index_netns(agent, warm) != index_netns(agent, cold)
    comments = dnat_comments(net)
    assert {f"fsb:{warm.sandbox_id}:{PORT}", f"fsb:{cold.sandbox_id}:{PORT}"} <= comments
    assert f"--dport {ports[0]} " in agent_rules(net)


async def test_claim_refill_capacity_and_kill9_recovery(
    agent: AgentProc, demo_image: str, containerd: ContainerdProc
) -> None:
    image = normalize_image_ref(demo_image)
    name = agent_name(agent)
    agent.start()
    await agent.ready()
    async with agent.stub() as stub:
        await wait_ready(stub, image)
        status = await stub.Status(agent_pb2.StatusRequest())
        # A ready slot is no sandbox and holds no used slot.
        assert (status.used_slots, len(status.sandboxes)) == (0, 0)
        first = await create(stub, "it-w-1", demo_image)
        assert first.warm
        await wait_ready(stub, image)  # refilled in the background
        # Two cold creates of the same capacity: the second retires the slot for room.
        assert not (await create(stub, "it-c-1", demo_image, log_cap=COLD_LOG_CAP)).warm
        assert not (await create(stub, "it-c-2", demo_image, log_cap=COLD_LOG_CAP)).warm
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await create(stub, "it-c-3", demo_image, log_cap=COLD_LOG_CAP)
        assert full.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await warm_ready(stub)).get(image, 0) == 0
        assert len(await containers(containerd, name)) <= CAPACITY
        await stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id="it-c-2"))
        await wait_ready(stub, image)  # room again: refilled
        before = await containers(containerd, name)
        old_slots = {cid for cid, labels in before.items() if WARM_SLOT_LABEL in labels}
        assert len(old_slots) == 1

    agent.kill()  # kill -9: the slot and the claimed sandbox stay behind in containerd
    agent.socket.unlink()  # stale: ready() waits for the new agent's
    agent.start()
    await agent.ready()
    async with agent.stub() as stub:
        await wait_ready(stub, image)
        after = await containers(containerd, name)
        new_slots = {cid for cid, labels in after.items() if WARM_SLOT_LABEL in labels}
        assert len(new_slots) == 1 and not new_slots & old_slots, (old_slots, new_slots)
        for old in old_slots:  # removed with everything it had on the host
            assert_gone(agent, old)
        status = await stub.Status(agent_pb2.StatusRequest())
        assert sorted(s.sandbox_id for s in status.sandboxes) == ["it-c-1", "it-w-1"]
        r = await run(stub, "it-w-1", ["sh", "-c", "echo $V"])
        assert r.stdout == b"world\n"
        # Its log is found by its sandbox id; delete removes container, channel and log.
        assert "== end" in await probe_output(stub, "it-w-1")
        cid = next(c for c, labels in after.items() if labels.get(SANDBOX_ID_LABEL) == "it-w-1")
        await stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id="it-w-1"))
        assert cid not in await containers(containerd, name)
        assert_gone(agent, cid)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.Logs(agent_pb2.SandboxLogsRequest(sandbox_id="it-w-1")).read()
        assert gone.value.code() is grpc.StatusCode.NOT_FOUND
        # A slot's container id names no sandbox: a delete by it touches nothing.
        slot = next(iter(new_slots))
        reply = await stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id=slot))
        assert not reply.existed and slot in await containers(containerd, name)


@pytest.mark.parametrize("agent", ["private"], indirect=True)
async def test_private_slot_networks_after_kill9_and_deletes(
    agent: AgentProc, demo_image: str, containerd: ContainerdProc, agent_net: AgentNet
) -> None:
    """What an agent's private network holds is exactly what lives: a namespace and veth per
    sandbox and per slot (plus the ready ones), a DNAT rule per published port; after a kill -9
    the old slot's go with it, the claimed sandbox keeps its own."""
    image = normalize_image_ref(demo_image)
    name = agent_name(agent)

    async def held() -> set[str]:
        """Namespaces the containers' index labels name (sandboxes and slots)."""
        cfg = plan.NetConfig(name, "", "")
        found = await containers(containerd, name)
        return {cfg.netns_name(int(lb[NET_INDEX_LABEL])) for lb in found.values()}

    async def exactly_what_lives() -> None:
        deadline = time.monotonic() + BOUND
        while True:
            want = await held()
            have = sandbox_netns(name)
            veths = agent_veths(agent_net, name)
            # The rest are the agent's ready namespaces (2 by default), no more.
            if want <= have and len(have - want) <= 2 and len(veths) == len(have):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"netns {sorted(have)} veths {sorted(veths)}, held {sorted(want)}")
            await asyncio.sleep(0.1)

    agent.start()
    await agent.ready()
    async with agent.stub() as stub:
        await wait_ready(stub, image)
        claimed = await create(stub, "it-pw-1", demo_image, net=True)
        assert claimed.warm
        await wait_ready(stub, image)
        before = await containers(containerd, name)
        (old_slot,) = {c for c, lb in before.items() if WARM_SLOT_LABEL in lb}
        old_ns = plan.NetConfig(name, "", "").netns_name(int(before[old_slot][NET_INDEX_LABEL]))
        await exactly_what_lives()
        assert dnat_comments(agent_net) == {f"fsb:it-pw-1:{PORT}"}

    agent.kill()  # kill -9: slot, sandbox and every namespace stay behind
    agent.socket.unlink()
    assert old_ns in sandbox_netns(name)
    agent.start()
    await agent.ready()
    async with agent.stub() as stub:
        await wait_ready(stub, image)
        after = await containers(containerd, name)
        assert old_slot not in after
        await exactly_what_lives()
        # The adopted sandbox's rule was rewritten; nothing of the old slot's is left.
        assert dnat_comments(agent_net) == {f"fsb:it-pw-1:{PORT}"}
        assert labels_of(claimed)[PUBLISHED_LABEL] == after_labels(after, "it-pw-1")
        await stub.DeleteSandbox(agent_pb2.DeleteSandboxRequest(sandbox_id="it-pw-1"))
        assert dnat_comments(agent_net) == set()
        await exactly_what_lives()
        # Cordoned, the slots are retired: only the ready namespaces stay.
        await stub.Cordon(agent_pb2.CordonRequest(cordon=True))
        deadline = time.monotonic() + BOUND
        while await containers(containerd, name):
            if time.monotonic() > deadline:
                pytest.fail("slots not retired")
            await asyncio.sleep(0.1)
        await exactly_what_lives()


def after_labels(found: dict[str, dict[str, str]], sid: str) -> str:
    return next(lb[PUBLISHED_LABEL] for lb in found.values() if lb.get(SANDBOX_ID_LABEL) == sid)


def assert_gone(agent: AgentProc, cid: str) -> None:
    """Nothing of container `cid` left on the host: channel, log, writable layer, mount."""
    assert not (agent.state_dir / "channels" / cid).exists()
    assert not (agent.state_dir / "logs" / f"{cid}.log").exists()
    assert not list((agent.state_dir / "runtime").glob(f"disks/{cid}*"))
    assert f"/{cid}" not in Path("/proc/self/mounts").read_text()


async def containers(containerd: ContainerdProc, agent_name: str) -> dict[str, dict[str, str]]:
    runtime = ContainerdRuntime(containerd.socket, "fastsandbox")
    try:
        return {s.id: dict(s.labels) for s in await runtime.list({AGENT_LABEL: agent_name})}
    finally:
        await runtime.close()
