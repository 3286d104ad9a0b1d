"""Private networks as plans: names, addresses, rules, allocators, and `PrivateNetwork` driven
through a recording `Runner` (the real commands run in tests/e2e/test_private_network.py)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

import pytest

from fastsandbox.agent.manager import SandboxManager, SandboxRequest
from fastsandbox.agent.network import for_agent, hook, plan
from fastsandbox.agent.network.for_agent import network_for
from fastsandbox.agent.network.plan import Exhausted, NetConfig, Published, RangeAllocator
from fastsandbox.agent.network.private import INDEX_LABEL, PUBLISHED_LABEL, PrivateNetwork
from fastsandbox.agent.runtime.fake import FakeRuntime
from fastsandbox.errors import CapacityExhausted, FailedPrecondition, RuntimeFailure
from fastsandbox.settings import AgentSettings

CFG = NetConfig(
    agent="pool-a1",
    agent_netns="/var/run/netns/fsb-pool-a1",
    agent_ip="10.209.0.7",
    subnet="10.211.0.0/29",
    port_range=(20000, 20002),
    forbidden=("10.209.0.0/24",),
)


def test_names_fit_the_kernel_limits_and_carry_the_agent_tag() -> None:
    assert len(CFG.veth_name(plan.MAX_INDEX)) <= 15  # IFNAMSIZ - 1
    assert CFG.netns_name(3) == f"fsbs-{CFG.tag}-3"
    assert plan.parse_index(CFG.netns_name(3), CFG.tag) == 3
    assert plan.parse_index(NetConfig("other", "", "").netns_name(3), CFG.tag) is None
    assert plan.parse_index(f"fsbs-{CFG.tag}-x", CFG.tag) is None


def test_each_sandbox_is_alone_on_a_31() -> None:
    pairs = [CFG.addresses(i) for i in range(CFG.slots)]
    assert CFG.slots == 4
    assert pairs[0] == ("10.211.0.0", "10.211.0.1")
    for gateway, address in pairs:
        link = ipaddress.ip_network(f"{gateway}/31")
        assert ipaddress.ip_address(address) in link
        others = {a for g, a in pairs if g != gateway}
        assert not any(ipaddress.ip_address(o) in link for o in others)
    with pytest.raises(ValueError, match="outside subnet"):
        CFG.addresses(CFG.slots)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("-A")]


def test_egress_none_refuses_everything_out_of_a_sandbox() -> None:
    rules = _lines(plan.static_rules(CFG))
    egress = [r for r in rules if r.startswith(f"-A {CFG.chain('EGRESS')} ")]
    assert egress == [f"-A {CFG.chain('EGRESS')} -j {CFG.chain('DENY')}"]
    assert not any("MASQUERADE" in r for r in rules)


def test_sandbox_to_sandbox_is_refused_before_published_ports_are_let_in() -> None:
    v, fwd = CFG.veth_match, CFG.chain("FWD")
    rules = [r for r in _lines(plan.static_rules(CFG)) if r.startswith(f"-A {fwd} ")]
    between = rules.index(f"-A {fwd} -i {v} -o {v} -j {CFG.chain('DENY')}")
    published = rules.index(f"-A {fwd} -o {v} -m conntrack --ctstate DNAT -j ACCEPT")
    assert between < published
    # Nothing else gets into a sandbox; the agent namespace's own addresses are closed too.
    assert f"-A {fwd} -o {v} -j {CFG.chain('DENY')}" in rules
    assert f"-A {CFG.chain('IN')} -i {v} -j {CFG.chain('DENY')}" in _lines(plan.static_rules(CFG))


def test_egress_allow_keeps_the_forbidden_closed_before_any_allowlist() -> None:
    cfg = NetConfig(**{**_fields(CFG), "egress": "allow", "egress_allow": ("0.0.0.0/0",)})
    egress = [
        r for r in _lines(plan.static_rules(cfg)) if r.startswith(f"-A {cfg.chain('EGRESS')} ")
    ]
    deny = cfg.chain("DENY")
    first_accept = next(i for i, r in enumerate(egress) if r.endswith("ACCEPT"))
    denied = {r.split(" -d ")[1].split()[0] for r in egress[:first_accept]}
    assert {"169.254.0.0/16", "127.0.0.0/8", "10.209.0.0/24", cfg.subnet} <= denied
    assert egress[-1] == f"-A {cfg.chain('EGRESS')} -j {deny}"  # an allowlist ends closed
    assert any("MASQUERADE" in r for r in _lines(plan.static_rules(cfg)))


def test_egress_allow_without_a_list_accepts_the_rest() -> None:
    cfg = NetConfig(**{**_fields(CFG), "egress": "allow"})
    egress = [
        r for r in _lines(plan.static_rules(cfg)) if r.startswith(f"-A {cfg.chain('EGRESS')} ")
    ]
    assert egress[-1] == f"-A {cfg.chain('EGRESS')} -j ACCEPT"


def test_published_ports_are_dnat_on_the_agent_address() -> None:
    p = Published(8080, 20001, "10.211.0.3", "sb-1")
    text = "\n".join(plan.dnat_commands(CFG, [p], "-A"))
    assert text.startswith("*nat\n-A " + CFG.chain("DNAT"))
    assert "-d 10.209.0.7/32 -p tcp -m tcp --dport 20001" in text
    assert "--to-destination 10.211.0.3:8080" in text and text.rstrip().endswith("COMMIT")
    assert plan.published_label([p]) == "8080:20001"
    assert plan.parse_published_label("8080:20001,x:y,9000:20002") == {8080: 20001, 9000: 20002}
    assert plan.endpoints("10.209.0.7", {9000: 20002, 8080: 20001}) == [
        "10.209.0.7:20001",
        "10.209.0.7:20002",
    ]


def test_range_allocator_hands_out_each_value_once_and_not_straight_back() -> None:
    alloc = RangeAllocator(1, 3, "port")
    assert [alloc.take(), alloc.take()] == [1, 2]
    alloc.release(1)
    assert alloc.take() == 3  # the cursor moves on before reusing a value just freed
    assert alloc.take() == 1
    with pytest.raises(Exhausted, match="all 3 ports"):
        alloc.take()
    alloc.mark(2)
    assert alloc.in_use == frozenset({1, 2, 3})


def _fields(cfg: NetConfig) -> dict[str, object]:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}


class Recorder:
    """A `Runner` that records argv lists and fails the ones matching `fail`."""

    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.fail = fail

    async def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        self.calls.append((list(argv), stdin))
        if self.fail and self.fail in " ".join(argv):
            raise RuntimeFailure(f"{argv[0]} failed: injected")
        if "-C" in argv:
            raise RuntimeFailure("no such rule")  # so the jump is inserted
        return ""


def _network(tmp_path: Path, runner: Recorder) -> PrivateNetwork:
    netns = tmp_path / "netns"
    netns.mkdir(exist_ok=True)
    agent = tmp_path / "agent-ns"
    agent.touch()
    cfg = NetConfig(**{**_fields(CFG), "agent_netns": str(agent)})
    return PrivateNetwork(cfg, runner=runner, ready=1, netns_dir=netns, require_root=False)


async def test_acquire_publish_release(tmp_path: Path) -> None:
    runner = Recorder()
    net = _network(tmp_path, runner)
    await net.start({})
    assert net.unavailable is None
    assert any("iptables-restore" in argv for argv, _ in runner.calls)
    inserted = [argv for argv, _ in runner.calls if "-I" in argv]
    assert len(inserted) == len(plan.jumps(net.cfg))
    a = await net.acquire("sb-a")
    b = await net.acquire("sb-b")
    assert a.index != b.index and a.path != b.path
    assert await net.acquire("sb-a") is a  # a retried create
    before = len(runner.calls)
    assert await net.publish(a, [8080]) == {8080: 20000}
    assert await net.publish(b, [8080]) == {8080: 20001}
    assert len(runner.calls) - before == 2  # one rule insert per create with ports
    with pytest.raises(CapacityExhausted, match="host port"):
        await net.publish(a, [1, 2])  # 1 left in the range: nothing is taken
    assert await net.publish(a, [9000]) == {8080: 20000, 9000: 20002}
    await net.release(a)
    deleted = runner.calls[-2:]
    assert any("-D" in (stdin or "") for _, stdin in deleted)
    assert net.get("sb-a") is None
    await net.close()


async def test_setup_failure_fails_every_create_closed(tmp_path: Path) -> None:
    net = _network(tmp_path, Recorder(fail="iptables-restore"))
    await net.start({})
    assert net.unavailable is not None and "injected" in net.unavailable
    with pytest.raises(FailedPrecondition, match="cannot make private networks"):
        await net.acquire("sb-x")


async def test_adopt_keeps_live_namespaces_and_deletes_the_rest(tmp_path: Path) -> None:
    runner = Recorder()
    net = _network(tmp_path, runner)
    for index in (0, 1):
        (net.netns_dir / net.cfg.netns_name(index)).touch()
    labels = {INDEX_LABEL: "1", PUBLISHED_LABEL: "8080:20001"}
    await net.start({"sb-live": labels})
    restore = next(stdin for argv, stdin in runner.calls if "iptables-restore" in argv)
    assert restore is not None and "--dport 20001" in restore  # its DNAT rule is rewritten
    deletes = [argv for argv, _ in runner.calls if argv[:3] == ["ip", "netns", "delete"]]
    assert deletes == [["ip", "netns", "delete", net.cfg.netns_name(0)]]
    adopted = net.get("sb-live")
    assert adopted is not None and adopted.published == {8080: 20001}
    assert (await net.acquire("sb-new")).index not in (1,)
    await net.close()


async def test_a_private_agent_without_its_own_namespace_refuses_creates(
    tmp_path: Path,
) -> None:
    """Fail closed: no silent fallback to the host network; nothing is made."""
    runtime = FakeRuntime()
    settings = AgentSettings(
        name="a1",
        pool="p",
        namespace="default",
        listen=f"unix://{tmp_path}/a.sock",
        state_dir=tmp_path,
        containerd_socket=tmp_path / "c.sock",
        network_mode="private",
        netns_path=None,
    )
    manager = SandboxManager(runtime, settings)
    await manager.start()
    with pytest.raises(FailedPrecondition, match="host network"):
        await manager.create(SandboxRequest(sandbox_id="sb-1", image="busybox:latest"))
    assert await runtime.list() == []
    assert manager.used_slots == 0
    await manager.aclose()


async def test_the_net_of_a_vanished_container_is_released(tmp_path: Path) -> None:
    """A container removed behind the agent's back (janitor, `ctr rm`) gives its network
    back at the next look; one whose create started after that look is kept."""
    net = _network(tmp_path, Recorder())
    await net.start({})
    gone = await net.acquire("sb-gone")
    kept = await net.acquire("sb-kept")
    before = net.seq + 1
    newer = await net.acquire("sb-newer")
    stale = net.stale({"sb-kept"}, before)
    assert stale == [gone]
    await net.release(gone)
    await net.release(gone)  # idempotent
    assert net.get("sb-gone") is None and net.get("sb-kept") is kept
    assert net.get("sb-newer") is newer
    await net.close()


def _agent_settings(tmp_path: Path, **extra: str) -> AgentSettings:
    return AgentSettings(
        name="a1",
        pool="p",
        namespace="default",
        listen=f"unix://{tmp_path}/a.sock",
        state_dir=tmp_path,
        containerd_socket=tmp_path / "c.sock",
        network_mode="private",
        netns_path=str(tmp_path),
        **extra,  # type: ignore[arg-type]
    )


async def test_gvisor_in_a_pod_gets_the_hook_as_runc_does(tmp_path: Path) -> None:
    """In a Pod runsc makes the sandbox's namespace itself (a `network` entry without a path)
    and runs the createRuntime hook with its sandbox process's pid: no refusal any more."""
    net = network_for(_agent_settings(tmp_path, pod_uid="u1", runtime="gvisor"))
    assert net is not None and net.unsupported is None and net.hook_dir == tmp_path


async def test_what_cannot_be_isolated_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gVisor agent whose wrapper would not enter the sandbox's namespace fails the create
    with the reason (never a sandbox on the agent's network)."""
    monkeypatch.setattr(for_agent, "GVISOR_ENTERS_SPEC_NETNS", False)
    manager = SandboxManager(FakeRuntime(), _agent_settings(tmp_path, runtime="gvisor"))
    await manager.start()
    with pytest.raises(FailedPrecondition, match="gVisor sandboxes cannot be put in a private"):
        await manager.create(SandboxRequest(sandbox_id="sb-1", image="busybox:latest"))
    await manager.aclose()


async def test_in_a_pod_runc_makes_the_namespace_and_the_hook_wires_it(tmp_path: Path) -> None:
    """An agent Pod (hook_dir): its rules are set where it runs, without nsenter (that needs
    CAP_SYS_ADMIN); no namespace or veth is made or deleted by the agent, a sandbox's net is
    an address and the hook's argv; the hook is staged, executable, in the state dir."""
    runner = Recorder()
    cfg = NetConfig(**{**_fields(CFG), "agent_netns": "/var/run/netns/cni-not-visible-here"})
    net = PrivateNetwork(
        cfg, runner=runner, ready=2, netns_dir=tmp_path / "netns", require_root=False,
        hook_dir=tmp_path / "state",
    )  # fmt: skip
    await net.start({"sb-live": {INDEX_LABEL: "0", PUBLISHED_LABEL: "8080:20000"}})
    assert net.unavailable is None
    staged = tmp_path / "state" / hook.HOOK_NAME
    assert staged.read_text() == hook.SCRIPT and staged.stat().st_mode & 0o111
    a = await net.acquire("sb-a")
    assert a.path == "" and a.index == 1
    assert a.hook == (str(staged), cfg.agent_netns, cfg.veth_name(1), *cfg.addresses(1))
    assert await net.publish(a, [8080]) == {8080: 20001}
    await net.release(a)
    await net.close()
    argvs = [argv for argv, _ in runner.calls]
    assert argvs and not any(argv[0] in ("nsenter", "ip", "sysctl") for argv in argvs), argvs
    restore = next(stdin for argv, stdin in runner.calls if argv[0] == "iptables-restore")
    assert restore is not None and "--dport 20000" in restore  # the adopted one's DNAT


async def test_a_pod_without_net_admin_fails_creates_naming_the_capabilities(
    tmp_path: Path,
) -> None:
    net = PrivateNetwork(
        CFG, runner=Recorder(fail="iptables-restore"), require_root=False, hook_dir=tmp_path,
    )  # fmt: skip
    await net.start({})
    assert net.unavailable is not None and "NET_ADMIN" in net.unavailable
    with pytest.raises(FailedPrecondition, match="NET_ADMIN and NET_RAW"):
        await net.acquire("sb-x")


async def test_a_pod_agent_hands_the_hook_to_the_runtime(tmp_path: Path) -> None:
    """The container spec of a private sandbox in a Pod names no namespace path (runc makes
    one) and carries the hook; the create fails closed when the hook cannot be staged."""
    runtime = FakeRuntime()
    settings = AgentSettings(
        name="a1",
        pool="p",
        namespace="default",
        listen=f"unix://{tmp_path}/a.sock",
        state_dir=tmp_path / "state",
        containerd_socket=tmp_path / "c.sock",
        network_mode="private",
        netns_path="/var/run/netns/cni-1",
        pod_uid="u1",
    )
    manager = SandboxManager(runtime, settings)
    assert manager.network is not None
    manager.network.runner = Recorder()
    manager.network.require_root = False
    await manager.start()
    await manager.create(SandboxRequest(sandbox_id="sb-1", image="busybox:latest"))
    spec = runtime.specs["sb-1"]
    assert spec.netns_path is None
    assert spec.netns_hook[0] == str(tmp_path / "state" / hook.HOOK_NAME)
    assert spec.netns_hook[1] == "/var/run/netns/cni-1"
    await manager.aclose()


@pytest.mark.parametrize("pod_uid", [None, "u1"])
def test_in_a_pod_egress_allow_refuses_every_agents_api_and_published_ports(
    tmp_path: Path, pod_uid: str | None
) -> None:
    """Another agent Pod's address is not known in a Pod (the cluster's Pod CIDR), so its API
    port and the published-port range are closed on every address, before any ACCEPT."""
    from fastsandbox.agent.network.for_agent import network_for

    settings = AgentSettings(
        name="a1",
        pool="p",
        namespace="default",
        listen="10.214.0.5:7443",
        state_dir=tmp_path,
        containerd_socket=tmp_path / "c.sock",
        network_mode="private",
        netns_path="/var/run/netns/cni-1",
        egress="allow",
        port_range=(20000, 29999),
        pod_uid=pod_uid,
    )
    network = network_for(settings)
    assert network is not None
    cfg = network.cfg
    egress = [
        r for r in _lines(plan.static_rules(cfg)) if r.startswith(f"-A {cfg.chain('EGRESS')} ")
    ]
    first_accept = next(i for i, r in enumerate(egress) if r.endswith("ACCEPT"))
    closed = [r for r in egress[:first_accept] if "--dport" in r]
    if pod_uid is None:
        # Embedded: the other agents' addresses are forbidden by CIDR (--forbid) instead.
        assert closed == []
        return
    deny = cfg.chain("DENY")
    assert closed == [
        f"-A {cfg.chain('EGRESS')} -p tcp -m tcp --dport 7443 -j {deny}",
        f"-A {cfg.chain('EGRESS')} -p tcp -m tcp --dport 20000:29999 -j {deny}",
    ]
