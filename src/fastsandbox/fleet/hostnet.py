"""The host-side pieces of `egress: allow` for embedded agents — made only when a pool asks.

A private sandbox's outbound packets leave its agent's namespace masqueraded as the agent's
address (agent/network/); to go further the host must forward them and masquerade the bridge
subnet. Each change is idempotent and made only for an agent whose pool has `egress: allow`:
- `net.ipv4.ip_forward=1` (host-wide). Turned on when it is off, logged, never turned back
  off (other software may rely on it by then).
- nat `FSB-HOST-NAT` (jumped to from POSTROUTING): MASQUERADE of the bridge subnet going out of
  any other interface.
- filter `FSB-HOST-FWD` (from FORWARD): accept bridge → elsewhere and the replies, for hosts
  whose FORWARD policy is DROP (Docker sets it).
- filter `FSB-HOST-GUARD` (from INPUT, bridge traffic only): a NEW connection from the address
  of an agent with egress is refused, so a sandbox cannot reach the host's own services on any
  of its addresses (replies to connections the host opened, e.g. to published ports, pass).
  One rule per agent, removed with the agent.
Agent namespaces also get a default route via the bridge address (only those with egress).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from fastsandbox.errors import RuntimeFailure
from fastsandbox.fleet import netns
from fastsandbox.fleet.netns import CniNetwork

log = logging.getLogger(__name__)

NAT_CHAIN = "FSB-HOST-NAT"
FWD_CHAIN = "FSB-HOST-FWD"
GUARD_CHAIN = "FSB-HOST-GUARD"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


async def _iptables(*args: str) -> None:
    await netns._run(["iptables", "-w", *args])


async def _ensure_chain(table: str, chain: str) -> None:
    with contextlib.suppress(RuntimeFailure):  # exists already
        await _iptables("-t", table, "-N", chain)


async def _ensure_rule(table: str, chain: str, *rule: str, first: bool = False) -> None:
    try:
        await _iptables("-t", table, "-C", chain, *rule)
    except RuntimeFailure:
        if first:
            await _iptables("-t", table, "-I", chain, "1", *rule)
        else:
            await _iptables("-t", table, "-A", chain, *rule)


def guard_rule(agent_ip: str) -> tuple[str, ...]:
    return (
        "-s", f"{agent_ip}/32", "-m", "conntrack", "--ctstate", "NEW",
        "-j", "REJECT", "--reject-with", "icmp-admin-prohibited",
    )  # fmt: skip


async def ensure_egress(network: CniNetwork, netns_name: str, agent_ip: str) -> None:
    """Everything an agent with `egress: allow` needs on the host (idempotent)."""
    gateway = network.gateway.split("/")[0]
    await netns._run(["ip", "-n", netns_name, "route", "replace", "default", "via", gateway])
    if IP_FORWARD.read_text().strip() != "1":
        IP_FORWARD.write_text("1\n")
        log.warning(
            "turned on net.ipv4.ip_forward for a pool with egress: allow (host-wide; left on)"
        )
    bridge, subnet = network.bridge, network.subnet
    await _ensure_chain("nat", NAT_CHAIN)
    await _ensure_rule("nat", NAT_CHAIN, "-s", subnet, "!", "-o", bridge, "-j", "MASQUERADE")
    await _ensure_rule("nat", "POSTROUTING", "-j", NAT_CHAIN)
    await _ensure_chain("filter", FWD_CHAIN)
    await _ensure_rule("filter", FWD_CHAIN, "-i", bridge, "!", "-o", bridge, "-j", "ACCEPT")
    await _ensure_rule(
        "filter", FWD_CHAIN, "-o", bridge, "-m", "conntrack", "--ctstate",
        "ESTABLISHED,RELATED", "-j", "ACCEPT",
    )  # fmt: skip
    await _ensure_rule("filter", "FORWARD", "-j", FWD_CHAIN, first=True)
    await _ensure_chain("filter", GUARD_CHAIN)
    await _ensure_rule("filter", GUARD_CHAIN, *guard_rule(agent_ip))
    await _ensure_rule("filter", "INPUT", "-i", bridge, "-j", GUARD_CHAIN, first=True)


async def remove_guard(agent_ip: str) -> None:
    """Drop the agent's host guard rule (fine when there is none)."""
    try:
        while True:  # duplicates of a crash-restart, if any
            await _iptables("-t", "filter", "-D", GUARD_CHAIN, *guard_rule(agent_ip))
    except RuntimeFailure:
        pass
