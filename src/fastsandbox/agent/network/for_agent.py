"""The agent's private network from its settings, and what a sandbox's container records of it.

Kept apart from the manager so its only network knowledge is `network_for` + `net_labels`.
"""

from __future__ import annotations

from fastsandbox.agent.network import plan
from fastsandbox.agent.network.private import (
    INDEX_LABEL,
    PUBLISHED_LABEL,
    PrivateNetwork,
    SandboxNet,
)
from fastsandbox.settings import AgentSettings


def _why_no_private_network(settings: AgentSettings) -> str | None:
    if settings.runtime == "gvisor" and not GVISOR_ENTERS_SPEC_NETNS:
        # runsc --network=host uses the namespace it is started in, not the spec's: until the
        # runtime wrapper enters the spec's namespace, a gVisor sandbox would sit on the
        # host's network. Refused rather than half isolated.
        return (
            "gVisor sandboxes cannot be put in a private network yet (the runsc wrapper does "
            "not enter the sandbox's namespace); use networkMode: shared or runtime: runc"
        )
    return None


# True: the runsc wrapper (agent/runtime/runsc_wrapper.py) starts runsc inside the network
# namespace named in the bundle's config.json, and fails the create when it cannot
# (tests/integration/test_gvisor_netns.py), so a gVisor sandbox gets the private path too.
# In a Kubernetes agent Pod the spec's `network` entry has no path: runsc itself then starts
# its sandbox process in a fresh namespace, runs the createRuntime hook (hook.py) with that
# process's pid, and the Sentry's host network is that namespace (measured with Debian's runsc
# 0.0~20221219; tests/e2e/test_kube_gvisor_network.py), as runc's container is.
GVISOR_ENTERS_SPEC_NETNS = True


def network_for(settings: AgentSettings) -> PrivateNetwork | None:
    """The agent's private network (made, not started); None in a shared network."""
    if settings.network_mode != "private":
        return None
    netns = settings.netns_path or ""
    return PrivateNetwork(
        plan.NetConfig(
            agent=settings.name,
            agent_netns=netns,
            agent_ip=settings.agent_ip,
            subnet=settings.sandbox_subnet,
            port_range=settings.port_range,
            egress=settings.egress,
            egress_allow=tuple(settings.egress_allow),
            forbidden=tuple(settings.forbid),
            forbidden_tcp_ports=_other_agents_ports(settings) if settings.pod_uid else (),
        ),
        unsupported=_why_no_private_network(settings),
        # In a Pod: the hook wires each sandbox's namespace, staged in the state dir (a
        # hostPath at the same path, so the node's runc finds it).
        hook_dir=settings.state_dir if settings.pod_uid else None,
    )


def _other_agents_ports(settings: AgentSettings) -> tuple[str, ...]:
    """What of another agent Pod a sandbox with egress allow could reach: its API (every agent
    of a fleet listens on the same port) and its sandboxes' endpoints (the same port range)."""
    first, last = settings.port_range
    ports = [f"{first}:{last}"]
    if settings.listens_on_tcp:
        ports.insert(0, settings.listen.rsplit(":", 1)[1])
    return tuple(ports)


def net_labels(net: SandboxNet) -> dict[str, str]:
    """How a restarted agent finds the sandbox's network again, and how the control plane
    learns its endpoints (labels travel in every SandboxState)."""
    return {
        INDEX_LABEL: str(net.index),
        PUBLISHED_LABEL: plan.published_label(
            plan.Published(port, host, net.ip, net.sandbox_id)
            for port, host in net.published.items()
        ),
    }
