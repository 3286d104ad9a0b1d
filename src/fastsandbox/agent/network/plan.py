"""What a private network is made of, as data: names, addresses, iptables rules, argv lists.

Pure functions and small allocators, no I/O, so every rule that keeps a sandbox in is unit-tested
(tests/unit/test_network_plan.py). `private.py` runs what this module plans.

Layout (one agent; A = the agent's network namespace, S = one sandbox's):

    S: eth0 10.211.0.(2i+1)/31 ── veth ── A: fv<tag><i> 10.211.0.(2i)/31      A: eth0 agentIP
       default via 10.211.0.(2i)           routes each /31 to its veth

A /31 per sandbox (RFC 3021) puts every sandbox on a link of its own: nothing of another sandbox is
on-link, so all traffic between sandboxes, and from a sandbox to anything, crosses A's FORWARD
(or INPUT) chain, where the rules below decide. No bridge inside A, hence no `br_netfilter`
(a host-wide switch) and no ARP between sandboxes.

Filtering, all in A, in chains of this agent's own (`FSB-<tag>-*`, jumped to from the built-in
chains), static for the agent's life; a sandbox adds only its DNAT rules:
- INPUT from a sandbox: only replies (ESTABLISHED/RELATED). A's own addresses — the agent API on
  Kubernetes, published ports reached from inside, the veth gateway — are closed to sandboxes.
- FORWARD: replies pass; sandbox → sandbox is refused (also through another sandbox's published
  port, which DNAT turns into sandbox → sandbox); into a sandbox only DNATed (published) traffic;
  out of a sandbox the egress chain decides: `none` refuses all, `allow` refuses the forbidden
  CIDRs first (the bridge subnet with the host's bridge address and every other agent,
  link-local with cloud metadata, loopback, multicast, the sandboxes' own subnet), then accepts
  the allowlist (or everything when there is none).
- Refusals are REJECT (TCP reset, else ICMP admin-prohibited), not DROP: a sandbox learns at
  once that it may not, instead of waiting out a timeout.
- nat: published ports are DNAT rules `agentIP:hostPort → sandboxIP:port` in a chain jumped to
  from PREROUTING and OUTPUT; `allow` adds MASQUERADE of the sandbox subnet out of A.
IPv6 is switched off inside S (its sysctl), so no link-local IPv6 path bypasses the IPv4 rules.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

NETNS_PREFIX = "fsbs-"
"""Sandbox namespaces: `fsbs-<agent tag>-<index>` under /var/run/netns."""
VETH_PREFIX = "fv"
SANDBOX_IFNAME = "eth0"
DEFAULT_SUBNET = "10.211.0.0/22"
"""Sandbox addresses inside each agent's namespace (each agent has its own copy: the
namespaces are separate, so agents may use the same subnet)."""
DEFAULT_PORT_RANGE = (20000, 29999)
"""Host ports published ports are taken from, on the agent's address."""
ALWAYS_FORBIDDEN: tuple[str, ...] = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
    "224.0.0.0/4",
    "240.0.0.0/4",
)
"""Never reachable from a sandbox, whatever the egress allowlist says."""
# One tag per agent: 6 hex digits keep `fv<tag><index>` within 15 characters (IFNAMSIZ).
TAG_LEN = 6
MAX_INDEX = 0xFFFF


def agent_tag(agent: str) -> str:
    """Short, stable, per-agent: namespaces, veths and chains carry it."""
    return hashlib.sha256(agent.encode()).hexdigest()[:TAG_LEN]


@dataclass(frozen=True, slots=True)
class NetConfig:
    """One agent's private network."""

    agent: str
    agent_netns: str
    """Path of the agent's network namespace (A)."""
    agent_ip: str
    """Published ports are reached at this address (A's own, on the node network)."""
    subnet: str = DEFAULT_SUBNET
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    egress: str = "none"
    egress_allow: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    """Extra CIDRs never reachable (the node network: bridge subnet, other agents, host)."""
    forbidden_tcp_ports: tuple[str, ...] = ()
    """TCP destination ports (`N` or `FIRST:LAST`) never reachable on any address with egress
    allow. In a Kubernetes Pod the other agent Pods' addresses are not known (the Pod network's
    CIDR is the cluster's), but what a sandbox must not reach there is: every agent's API port
    and the published-port range its sandboxes' endpoints live in (for_agent.py)."""

    @property
    def tag(self) -> str:
        return agent_tag(self.agent)

    def chain(self, what: str) -> str:
        return f"FSB-{self.tag}-{what}"

    @property
    def veth_match(self) -> str:
        """iptables' interface wildcard for this agent's sandbox veths."""
        return f"{VETH_PREFIX}{self.tag}+"

    def netns_name(self, index: int) -> str:
        return f"{NETNS_PREFIX}{self.tag}-{index}"

    def veth_name(self, index: int) -> str:
        return f"{VETH_PREFIX}{self.tag}{index:x}"

    def addresses(self, index: int) -> tuple[str, str]:
        """(gateway in A, sandbox address) of slot `index`: the two ends of a /31."""
        net = ipaddress.ip_network(self.subnet)
        base = int(net.network_address) + 2 * index
        if index < 0 or base + 1 > int(net.broadcast_address):
            raise ValueError(f"index {index} is outside subnet {self.subnet}")
        return str(ipaddress.ip_address(base)), str(ipaddress.ip_address(base + 1))

    @property
    def slots(self) -> int:
        """How many sandboxes the subnet holds (a /31 each)."""
        return min(ipaddress.ip_network(self.subnet).num_addresses // 2, MAX_INDEX + 1)

    def all_forbidden(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for cidr in (*ALWAYS_FORBIDDEN, self.subnet, *self.forbidden):
            seen[str(ipaddress.ip_network(cidr, strict=False))] = None
        return tuple(seen)


def parse_index(netns_name: str, tag: str) -> int | None:
    """The slot index of one of this agent's sandbox namespaces, or None for any other name."""
    prefix = f"{NETNS_PREFIX}{tag}-"
    if not netns_name.startswith(prefix):
        return None
    rest = netns_name[len(prefix) :]
    return int(rest) if rest.isdigit() else None


# -- allocators ---------------------------------------------------------------------------------
class Allocator(Protocol):
    """Hands out integers of a fixed range, lowest free first."""

    def take(self) -> int:
        """A free value, now in use; `Exhausted` when none is left."""
        ...

    def mark(self, value: int) -> None:
        """Record `value` as in use (adoption after a restart)."""
        ...

    def release(self, value: int) -> None: ...

    @property
    def in_use(self) -> frozenset[int]: ...


class Exhausted(Exception):
    """No value left in an allocator's range."""


@dataclass(slots=True)
class RangeAllocator:
    """Lowest-free allocation over `[first, last]`. A freed value is handed out again only after
    every other free one (a cursor), so a released host port is not instantly reused by the
    next sandbox while a client may still hold a connection to the old one."""

    first: int
    last: int
    what: str = "value"
    _used: set[int] = field(default_factory=set)
    _next: int = -1

    def __post_init__(self) -> None:
        if self.first > self.last:
            raise ValueError(f"empty {self.what} range {self.first}-{self.last}")
        self._next = self.first

    def take(self) -> int:
        size = self.last - self.first + 1
        if len(self._used) >= size:
            raise Exhausted(f"all {size} {self.what}s ({self.first}-{self.last}) are in use")
        candidate = self._next
        for _ in range(size):
            if candidate not in self._used:
                self._used.add(candidate)
                self._next = candidate + 1 if candidate < self.last else self.first
                return candidate
            candidate = candidate + 1 if candidate < self.last else self.first
        raise Exhausted(f"all {size} {self.what}s are in use")  # unreachable: counted above

    def mark(self, value: int) -> None:
        if not self.first <= value <= self.last:
            raise ValueError(f"{self.what} {value} is outside {self.first}-{self.last}")
        self._used.add(value)

    def release(self, value: int) -> None:
        self._used.discard(value)

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._used)


# -- commands -----------------------------------------------------------------------------------
def in_netns(path: str, argv: Sequence[str]) -> list[str]:
    """Run `argv` in the network namespace at `path` (any path: a named netns or a Pod's)."""
    return ["nsenter", f"--net={path}", "--", *argv]


def prepare_commands(cfg: NetConfig, index: int) -> list[tuple[list[str], str | None]]:
    """(argv, stdin) steps that make slot `index`'s namespace and veth, ready to be joined.

    Four processes, none on a create's path (`private.py` keeps a few namespaces ready)."""
    ns = cfg.netns_name(index)
    veth = cfg.veth_name(index)
    gateway, address = cfg.addresses(index)
    in_a = "\n".join(
        (
            f"link add {veth} type veth peer name {SANDBOX_IFNAME} netns {ns}",
            f"addr add {gateway}/31 dev {veth}",
            f"link set {veth} up",
            "",
        )
    )
    in_s = "\n".join(
        (
            "link set lo up",
            f"addr add {address}/31 dev {SANDBOX_IFNAME}",
            f"link set {SANDBOX_IFNAME} up",
            f"route add default via {gateway}",
            "",
        )
    )
    return [
        (["ip", "netns", "add", ns], None),
        # Before the veth exists: eth0 is then born without an IPv6 link-local address.
        (["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *_NO_IPV6], None),
        (in_netns(cfg.agent_netns, ["ip", "-batch", "-"]), in_a),
        (["ip", "-n", ns, "-batch", "-"], in_s),
    ]


_NO_IPV6 = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")


_NO_IPV6 = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")


def remove_command(cfg: NetConfig, index: int) -> list[str]:
    """Deleting the namespace deletes its end of the veth, and with it the other end."""
    return ["ip", "netns", "delete", cfg.netns_name(index)]


@dataclass(frozen=True, slots=True)
class Published:
    """One published port: `agentIP:host_port` → `sandbox_ip:port` (TCP)."""

    port: int
    host_port: int
    sandbox_ip: str
    sandbox_id: str


def dnat_rule(cfg: NetConfig, p: Published) -> list[str]:
    """The rule spec (after `-A/-D CHAIN`) of one published port."""
    return [
        "-d", f"{cfg.agent_ip}/32", "-p", "tcp", "-m", "tcp", "--dport", str(p.host_port),
        "-m", "comment", "--comment", f"fsb:{p.sandbox_id}:{p.port}",
        "-j", "DNAT", "--to-destination", f"{p.sandbox_ip}:{p.port}",
    ]  # fmt: skip


def dnat_commands(cfg: NetConfig, published: Iterable[Published], op: str) -> list[str]:
    """`iptables-restore --noflush` input adding (`-A`) or deleting (`-D`) DNAT rules: one
    process for any number of ports, applied atomically."""
    lines = ["*nat"]
    for p in published:
        lines.append(" ".join([op, cfg.chain("DNAT"), *dnat_rule(cfg, p)]))
    lines += ["COMMIT", ""]
    return lines


def _deny(chain: str) -> list[str]:
    return [
        f"-A {chain} -p tcp -j REJECT --reject-with tcp-reset",
        f"-A {chain} -j REJECT --reject-with icmp-admin-prohibited",
    ]


def static_rules(cfg: NetConfig, published: Iterable[Published] = ()) -> str:
    """The whole ruleset of the agent's chains, for `iptables-restore --noflush` (which
    replaces exactly the chains it declares, atomically, and leaves all others alone).
    `published`: DNAT rules of sandboxes adopted after a restart."""
    v = cfg.veth_match
    deny, inp, fwd, egress = (cfg.chain(c) for c in ("DENY", "IN", "FWD", "EGRESS"))
    dnat, snat = cfg.chain("DNAT"), cfg.chain("SNAT")
    lines = ["*filter"]
    lines += [f":{c} - [0:0]" for c in (deny, inp, fwd, egress)]
    lines += _deny(deny)
    lines += [
        f"-A {inp} -i {v} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A {inp} -i {v} -j {deny}",
        f"-A {fwd} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A {fwd} -i {v} -o {v} -j {deny}",
        f"-A {fwd} -o {v} -m conntrack --ctstate DNAT -j ACCEPT",
        f"-A {fwd} -o {v} -j {deny}",
        f"-A {fwd} -i {v} -j {egress}",
    ]
    if cfg.egress == "allow":
        lines += [f"-A {egress} -d {cidr} -j {deny}" for cidr in cfg.all_forbidden()]
        lines += [
            f"-A {egress} -p tcp -m tcp --dport {ports} -j {deny}"
            for ports in cfg.forbidden_tcp_ports
        ]
        if cfg.egress_allow:
            lines += [f"-A {egress} -d {cidr} -j ACCEPT" for cidr in cfg.egress_allow]
            lines.append(f"-A {egress} -j {deny}")
        else:
            lines.append(f"-A {egress} -j ACCEPT")
    else:
        lines.append(f"-A {egress} -j {deny}")
    lines += ["COMMIT", "*nat", f":{dnat} - [0:0]", f":{snat} - [0:0]"]
    lines += [" ".join(["-A", dnat, *dnat_rule(cfg, p)]) for p in published]
    if cfg.egress == "allow":
        lines.append(f"-A {snat} -s {cfg.subnet} ! -o {v} -j MASQUERADE")
    lines += ["COMMIT", ""]
    return "\n".join(lines)


def jumps(cfg: NetConfig) -> list[tuple[str, str, str]]:
    """(table, built-in chain, our chain): each jump is inserted once, first in its chain."""
    return [
        ("filter", "INPUT", cfg.chain("IN")),
        ("filter", "FORWARD", cfg.chain("FWD")),
        ("nat", "PREROUTING", cfg.chain("DNAT")),
        ("nat", "OUTPUT", cfg.chain("DNAT")),
        ("nat", "POSTROUTING", cfg.chain("SNAT")),
    ]


def teardown_rules(cfg: NetConfig) -> list[list[str]]:
    """iptables argv lists removing the agent's jumps and chains (agent removal)."""
    out: list[list[str]] = []
    for table, builtin, ours in jumps(cfg):
        out.append(["iptables", "-w", "-t", table, "-D", builtin, "-j", ours])
    for table, chains in (
        ("filter", ("IN", "FWD", "EGRESS", "DENY")),
        ("nat", ("DNAT", "SNAT")),
    ):
        for c in chains:
            out.append(["iptables", "-w", "-t", table, "-F", cfg.chain(c)])
        for c in chains:
            out.append(["iptables", "-w", "-t", table, "-X", cfg.chain(c)])
    return out


def published_label(published: Iterable[Published]) -> str:
    """`port:hostPort,...`: the container label that survives an agent restart."""
    return ",".join(f"{p.port}:{p.host_port}" for p in sorted(published, key=lambda p: p.port))


def parse_published_label(value: str) -> dict[int, int]:
    """port → host port from `published_label`; malformed items are skipped."""
    out: dict[int, int] = {}
    for item in value.split(","):
        port, _, host = item.partition(":")
        if port.strip().isdigit() and host.strip().isdigit():
            out[int(port)] = int(host)
    return out


def endpoints(agent_ip: str, published: Mapping[int, int]) -> list[str]:
    """`agentIP:hostPort` per declared port, in port order."""
    return [f"{agent_ip}:{published[p]}" for p in sorted(published)]
