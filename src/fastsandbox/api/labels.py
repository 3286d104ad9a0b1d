"""Every `fastsandbox.io/...` key, defined once: the API group and version, the finalizer, and
the labels and annotations we put on containers, Pods and API objects.

Other modules import these names; a unit test (tests/unit/test_constants_once.py) fails when a
`fastsandbox.io/` literal appears anywhere else in src/. Container labels are read back after a
restart (recovery, the janitor) by agents and control planes of other versions, so a key here
never changes its spelling.
"""

from __future__ import annotations

from typing import Final, Literal

API_GROUP: Final = "fastsandbox.io"
ApiVersion = Literal["fastsandbox.io/v1alpha1"]
API_VERSION: Final[ApiVersion] = "fastsandbox.io/v1alpha1"

# Held by every Sandbox until its slot and ports are released (control/sandbox_delete.py).
CLEANUP_FINALIZER: Final = "fastsandbox.io/cleanup"
API_TOKEN_LABEL: Final = "fastsandbox.io/api-token"
# On an agent Pod's own credentials Secret (Kubernetes): which agent it belongs to.
AGENT_CREDENTIALS_LABEL: Final = "fastsandbox.io/agent-credentials"
"""On the Secrets that hold tenant token records (store/tokens_kubernetes.py)."""

# -- labels on containers (containerd), set by the agent and the control plane ----------------
MANAGED_LABEL: Final = "fastsandbox.io/managed"
"""`true` on every container we made; the janitor looks at nothing else."""
AGENT_LABEL: Final = "fastsandbox.io/agent"
"""The agent that owns the container (also what an agent lists its own containers by)."""
SANDBOX_ID_LABEL: Final = "fastsandbox.io/sandbox-id"
NAMESPACE_LABEL: Final = "fastsandbox.io/namespace"
NAME_LABEL: Final = "fastsandbox.io/name"
PORTS_LABEL: Final = "fastsandbox.io/ports"
"""The sandbox's exposed ports, "80,443": recovery rebuilds port reservations from it."""
PUBLISHED_LABEL: Final = "fastsandbox.io/published"
"""A private sandbox's published ports, "8080:20001,9000:20002" (port:hostPort on its agent's
address): the agent writes it, the control plane's endpoints are read from it."""
NET_INDEX_LABEL: Final = "fastsandbox.io/net-index"
"""A private sandbox's slot in its agent's sandbox subnet (how a restarted agent finds it)."""


def published_endpoints(agent_ip: str, value: str) -> list[str]:
    """`agentIP:hostPort` for each item of a `PUBLISHED_LABEL` value, in port order."""
    pairs: list[tuple[int, int]] = []
    for item in value.split(","):
        port, _, host = item.partition(":")
        if port.strip().isdigit() and host.strip().isdigit():
            pairs.append((int(port), int(host)))
    return [f"{agent_ip}:{host}" for _, host in sorted(pairs)]


UID_LABEL: Final = "fastsandbox.io/uid"
"""The Sandbox object's uid."""
WARM_SLOT_LABEL: Final = "fastsandbox.io/warm-slot"
"""On a warm slot (a container made ahead of any request, its supervisor waiting), the image it
was made for; a claim removes it and sets the sandbox's labels. Such a container is no sandbox:
no record points at it and the janitor leaves it to its live agent."""
REQUEST_LABEL: Final = "fastsandbox.io/request"
"""The create request, so a control plane that lost its record can rebuild it."""
DISK_LAYER_LABEL: Final = "fastsandbox.io/disk-layer"
"""Directory holding the container's size-limited writable layer (set by the runtime only)."""

# -- labels and annotations on agent Pods (fleet/kubernetes.py) and containers ---------------
POOL_LABEL: Final = "fastsandbox.io/pool"
"""The pool an agent Pod, or a sandbox container, belongs to."""
VERSION_LABEL: Final = "fastsandbox.io/agent-version"
"""The agent version as a label value (sanitised); the exact one is in `VERSION_ANNOTATION`."""
VERSION_ANNOTATION: Final = "fastsandbox.io/agent-version"

# -- annotations on API objects ---------------------------------------------------------------
IDEMPOTENCY_KEY_ANNOTATION: Final = "fastsandbox.io/idempotency-key"
SPEC_HASH_ANNOTATION: Final = "fastsandbox.io/spec-hash"
MODE_ANNOTATION: Final = "fastsandbox.io/consistency-mode"
DEMAND_ANNOTATION: Final = "fastsandbox.io/demand"
"""On a pool: demand followers leave for the leader, `{sandbox name: unix deadline}`."""
GENERATED_BY_ANNOTATION: Final = "fastsandbox.io/generated-by"
"""On generated CRDs: what made them."""
