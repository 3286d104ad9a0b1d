"""The OCI hook that wires a sandbox's private network inside a Kubernetes agent Pod.

Why a hook (docs/security.md, "Private networks on Kubernetes"): in the embedded shape the agent
makes each sandbox's namespace itself (`ip netns add`, a bind mount under /var/run/netns) and
runc joins it by path. An agent in a Pod cannot: its mounts live in the Pod's mount namespace,
invisible to the node's runc unless `mountPropagation: Bidirectional`, which Kubernetes allows
only to privileged containers; and moving a veth end into another namespace needs CAP_NET_ADMIN
over the *node's* user namespace. So runc makes the namespace (a `network` entry without a path)
and runs this hook as `createRuntime`: on the host, in the runtime's namespaces, as root, after
the container's namespaces exist and before its process runs, with the container state (its
`pid`) on stdin. The hook only wires what the agent planned (plan.py): a /31 veth from the
sandbox's namespace into the agent Pod's, addresses, a default route, IPv6 off; the agent, with
NET_ADMIN in its own Pod namespace only, keeps the filtering and DNAT rules (private.py).

The script is POSIX sh calling `ip` and `nsenter` (iproute2, util-linux: on every Kubernetes
node image we know; kubelet itself uses nsenter): nothing of the agent's image runs on the host.
It is staged into the agent's state dir, which the Pod mounts from the host at the same path (as
fsb-init), so the path the spec names is the host's. A failing step fails the hook, hence the
create; the namespace dies with the container's process, and the veth with it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastsandbox.agent.network.plan import SANDBOX_IFNAME, NetConfig

HOOK_NAME = "fsb-nethook"

# $1 agent Pod netns path (the node's), $2 veth name in it, $3 gateway, $4 sandbox address.
SCRIPT = f"""#!/bin/sh
# fsb-nethook: wire a Fast Sandbox sandbox's private network (agent/network/hook.py).
set -eu
[ $# -eq 4 ] || {{ echo "usage: $0 AGENT_NETNS VETH GATEWAY ADDRESS" >&2; exit 2; }}
agent_ns=$1 veth=$2 gw=$3 addr=$4
pid=$(tr -d '\\n' | sed -n 's/.*"pid"[[:space:]]*:[[:space:]]*\\([0-9][0-9]*\\).*/\\1/p')
[ -n "$pid" ] || {{ echo "fsb-nethook: no pid in the container state" >&2; exit 1; }}
sbx=/proc/$pid/ns/net
[ -e "$agent_ns" ] || {{ echo "fsb-nethook: agent netns $agent_ns is gone" >&2; exit 1; }}
# IPv6 off before the veth exists: its end is then born without a link-local address.
nsenter --net="$sbx" sh -euc '
  for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6
  do [ ! -e "$f" ] || echo 1 >"$f"; done'
# Forwarding in the agent's namespace (per namespace; a Pod may not set it itself).
nsenter --net="$agent_ns" sh -euc 'echo 1 >/proc/sys/net/ipv4/ip_forward'
# A leftover of a sandbox whose namespace the kernel has not finished tearing down: the
# agent hands out an index only when no live sandbox holds it.
nsenter --net="$agent_ns" ip link delete "$veth" 2>/dev/null || true
nsenter --net="$agent_ns" ip link add "$veth" type veth peer name {SANDBOX_IFNAME} netns "$pid"
nsenter --net="$agent_ns" ip addr add "$gw/31" dev "$veth"
nsenter --net="$agent_ns" ip link set "$veth" up
nsenter --net="$sbx" ip link set lo up
nsenter --net="$sbx" ip addr add "$addr/31" dev {SANDBOX_IFNAME}
nsenter --net="$sbx" ip link set {SANDBOX_IFNAME} up
nsenter --net="$sbx" ip route add default via "$gw"
"""


def stage(directory: Path) -> Path:
    """Write the hook into `directory` (atomically: a create may be running it) → its path."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / HOOK_NAME
    tmp = directory / f".{HOOK_NAME}.{os.getpid()}"
    tmp.write_text(SCRIPT)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target


def argv(hook: Path, cfg: NetConfig, index: int) -> tuple[str, ...]:
    """The hook's argv for slot `index` of the agent `cfg` describes."""
    gateway, address = cfg.addresses(index)
    return (str(hook), cfg.agent_netns, cfg.veth_name(index), gateway, address)
