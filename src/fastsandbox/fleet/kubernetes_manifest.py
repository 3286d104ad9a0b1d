"""The agent Pod of the Kubernetes fleet, as a pure manifest: no API calls, no state.

`fleet/kubernetes.py` owns the Pod's lifecycle (create, wait for an IP, adopt, delete); this
module only says what the Pod is: labels and ownerReference, `fsb agent` args (built by
`AgentArgs`, agent/args.py), its credentials Secret mounted, the containerd socket and the hostPath
state dir, a locked-down securityContext, and the pool's `agentTemplate` merged in.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastsandbox import settings
from fastsandbox.agent.args import AgentArgs
from fastsandbox.api import labels as keys
from fastsandbox.api.agent_template import AGENT_CONTAINER, AgentTemplate
from fastsandbox.api.labels import API_VERSION
from fastsandbox.api.models import SandboxPool
from fastsandbox.fleet.kubernetes_credentials import (
    CREDENTIALS_DIR,
    TLS_CERT,
    TLS_KEY,
    TOKEN_FILE,
    credentials_secret,
)
from fastsandbox.fleet.warm_limits import DEFAULT_CPU, DEFAULT_MEMORY, warm_limit_args
from fastsandbox.settings import DELETE_GRACE_SECONDS, LogSettings

AGENT_PORT = 7443
APP_LABEL = "app.kubernetes.io/name"
APP_NAME = "fastsandbox-agent"
POOL_LABEL = keys.POOL_LABEL
VERSION_LABEL = keys.VERSION_LABEL
# The exact version: a label value allows only [A-Za-z0-9-_.] and 63 characters.
VERSION_ANNOTATION = keys.VERSION_ANNOTATION
CONTAINERD_SOCKET = str(settings.CONTAINERD_SOCKET)  # the node's, mounted at the same path
# Host directory holding every agent's state (sandbox logs, the staged fsb-init), mounted at the
# same path in the Pod: containerd opens these paths on the host.
STATE_ROOT = "/var/lib/fastsandbox"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def version_label(version: str) -> str:
    """`version` as a label value: kept when valid, else a readable digest of it."""
    if len(version) <= 63 and _LABEL_VALUE.match(version):
        return version
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", version).strip("-_.")[:50].strip("-_.")
    digest = hashlib.sha256(version.encode()).hexdigest()
    return f"{cleaned}-{digest[:8]}" if cleaned else digest[:12]


def merge_template(template: AgentTemplate | None, pod: dict[str, Any]) -> dict[str, Any]:
    """Apply the pool's `agentTemplate` (api/agent_template.py: an allowlist, not a Pod) to `pod`.

    The template contributes only placement (nodeSelector, tolerations, affinity,
    priorityClassName), imagePullSecrets, the agent container's resources and plain labels.
    Everything the agent needs to work and everything that decides its privileges (image, args,
    token, volumes, securityContext, ServiceAccount, host namespaces, other containers) comes
    from `pod` alone; on a label clash ours wins.
    """
    if template is None:
        return pod
    meta = pod["metadata"]
    labels = {**template.metadata.labels, **meta.get("labels", {})}
    if labels:
        meta["labels"] = labels
    spec = pod["spec"]
    for key, value in template.pod_fields().items():
        if key not in spec:  # never ours: `pod` sets none of the template's fields
            spec[key] = value
    resources = template.agent_resources()
    if resources:
        (agent,) = (c for c in spec["containers"] if c["name"] == AGENT_CONTAINER)
        agent["resources"] = resources
    return pod


@dataclass(frozen=True, slots=True)
class AgentPodSpec:
    """What the fleet decides for every agent Pod it makes (the pool decides the rest)."""

    agent_image: str
    containerd_namespace: str = "k8s.io"
    insecure_registries: tuple[str, ...] = ()
    grace_seconds: float = DELETE_GRACE_SECONDS
    """The agents' default SIGTERM → SIGKILL grace on sandbox delete."""
    pod_grace_seconds: int = 30
    image_pull_policy: str = "IfNotPresent"
    log: LogSettings = field(default_factory=LogSettings)
    default_cpu: str = DEFAULT_CPU
    """The server's default sandbox limits: a gVisor pool's warm slots are made with the
    pool's effective defaults (fleet/warm_limits.py)."""
    default_memory: str = DEFAULT_MEMORY


def pod_manifest(pool: SandboxPool, name: str, spec: AgentPodSpec) -> dict[str, Any]:
    """The agent Pod for `pool`, the pool's `agentTemplate` merged."""
    ns, pool_name = pool.metadata.namespace, pool.metadata.name
    version = pool.spec.agent_version
    labels = {APP_LABEL: APP_NAME, POOL_LABEL: pool_name}
    annotations = {}
    if version:
        labels[VERSION_LABEL] = version_label(version)
        annotations[VERSION_ANNOTATION] = version
    # The image's entrypoint is `fsb`; an agent Pod runs `fsb agent ...`.
    agent = AgentArgs(
        name="$(POD_NAME)",
        pool=pool_name,
        namespace=ns,
        listen=f"$(POD_IP):{AGENT_PORT}",
        agent_ip="$(POD_IP)",
        state_dir=Path(f"{STATE_ROOT}/agents/$(POD_NAME)"),
        containerd_socket=Path(CONTAINERD_SOCKET),
        containerd_namespace=spec.containerd_namespace,
        capacity=pool.spec.max_sandboxes_per_agent,
        runtime=pool.spec.runtime.value,
        # Sandboxes join this Pod's network namespace and cgroup (agent/pod.py).
        pod_uid="$(POD_UID)",
        # Passed as the pool says: an agent that cannot honour `private` fails its creates
        # with the reason (e.g. gVisor in a Pod; docs/security.md).
        network_mode=pool.spec.network_mode.value,
        egress=pool.spec.egress.value,
        egress_allow=tuple(pool.spec.egress_allow),
        # With egress allow, the node's own address stays closed to sandboxes (as the host is
        # in the embedded shape); the rest of the cluster network is the pool's NetworkPolicy's.
        forbid=("$(HOST_IP)/32",),
        grace=spec.grace_seconds,
        log_level=spec.log.level,
        log_format="json",
        version=version or None,
        insecure_registry=tuple(spec.insecure_registries),
        # Its own token and TLS certificate, from Secret `<pod>-credentials` (read-only, 0400).
        token_file=Path(f"{CREDENTIALS_DIR}/{TOKEN_FILE}"),
        tls_cert=Path(f"{CREDENTIALS_DIR}/{TLS_CERT}"),
        tls_key=Path(f"{CREDENTIALS_DIR}/{TLS_KEY}"),
        warm_slots=pool.spec.warm_slots,
        warm_image=tuple(pool.spec.prewarm_images),
        **warm_limit_args(pool, spec.default_cpu, spec.default_memory),  # type: ignore[arg-type]
    )
    args = ["agent", *agent.argv()]
    resources = {
        k: v
        for k, v in (
            ("cpu", pool.spec.agent_resources.cpu),
            ("memory", pool.spec.agent_resources.memory),
        )
        if v
    }
    container: dict[str, Any] = {
        "name": AGENT_CONTAINER,
        "image": spec.agent_image,
        "imagePullPolicy": spec.image_pull_policy,
        "args": args,
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("POD_UID", "metadata.uid"),
            _field_env("POD_IP", "status.podIP"),
            _field_env("NODE_NAME", "spec.nodeName"),
            _field_env("HOST_IP", "status.hostIP"),
            # iptables-legacy's lock file: the root filesystem is read-only, /tmp is not.
            {"name": "XTABLES_LOCKFILE", "value": "/tmp/xtables.lock"},
        ],
        "ports": [{"name": "agent", "containerPort": AGENT_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "tcpSocket": {"port": AGENT_PORT},
            "periodSeconds": 2,
            "timeoutSeconds": 1,
            "failureThreshold": 3,
        },
        "volumeMounts": [
            {"name": "containerd-socket", "mountPath": CONTAINERD_SOCKET},
            {"name": "state", "mountPath": STATE_ROOT},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True},
        ],
        # containerd and the runc shim, on the host, do every privileged step (namespaces,
        # mounts, cgroups, pulls; a private sandbox's veth through the network hook). The
        # agent runs as uid 0 only because the containerd socket and the hostPath state dir
        # are root-owned (mode 0660 / 0755): with capabilities dropped, root passes plain
        # owner permission checks and nothing more. No privilege escalation, a read-only
        # root filesystem (writes go to the state dir and /tmp), the runtime's default
        # seccomp profile. The real power is the socket itself: whoever drives containerd
        # owns the node, which is why the agent API needs its token.
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": agent_capabilities(pool.spec.network_mode.value),
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if resources:
        # Sizes the Pod for the scheduler; sandboxes get cgroups of their own.
        container["resources"] = {"requests": resources, "limits": resources}
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "SandboxPool",
                    "name": pool_name,
                    "uid": pool.metadata.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": spec.pod_grace_seconds,
            # The agent talks to containerd, never to the API server.
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "containers": [container],
            "volumes": [
                {
                    "name": "containerd-socket",
                    "hostPath": {"path": CONTAINERD_SOCKET, "type": "Socket"},
                },
                {
                    "name": "state",
                    "hostPath": {"path": STATE_ROOT, "type": "DirectoryOrCreate"},
                },
                {"name": "tmp", "emptyDir": {}},
                {
                    "name": "credentials",
                    "secret": {"secretName": credentials_secret(name), "defaultMode": 0o400},
                },
            ],
        },
    }
    if annotations:
        pod["metadata"]["annotations"] = annotations
    return merge_template(pool.spec.agent_template, pod)


PRIVATE_NETWORK_CAPABILITIES = ("NET_ADMIN", "NET_RAW")
"""What an agent Pod of a `private` pool keeps: the sandboxes' filtering and DNAT rules live in
the Pod's own network namespace (iptables: NET_ADMIN; NET_RAW for iptables-legacy's socket).
Both act on that namespace only, never the node's (docs/security.md)."""


def agent_capabilities(network_mode: str) -> dict[str, list[str]]:
    """The agent container's capabilities: none, but those a private network needs."""
    if network_mode == "private":
        return {"drop": ["ALL"], "add": list(PRIVATE_NETWORK_CAPABILITIES)}
    return {"drop": ["ALL"]}


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
