"""An agent running in a Kubernetes Pod: make its sandboxes part of that Pod.

The agent asks the node's containerd to create sandboxes, so their processes are children of a
runc shim on the host, not of the agent. Left alone they would land in the shim's network
namespace, the *node's*, and in a cgroup outside the Pod. Instead, at start the agent finds its
Pod's CRI sandbox (the "pause" container containerd's CRI plugin made for the Pod, labelled
`io.kubernetes.pod.uid` and `io.cri-containerd.kind=sandbox`, in namespace `k8s.io`) and reads
two things from its runtime spec:

- the network namespace path (`/var/run/netns/cni-...`): sandboxes join it, so they share the
  Pod's IP and their endpoints are `podIP:port`;
- the cgroup path: its parent is the Pod's cgroup, which becomes the sandboxes' cgroup parent,
  so the Pod's resources bound the agent and its sandboxes together (cgroupfs paths as they are;
  systemd-driver `slice:prefix:name` paths are expanded to the slice's cgroupfs path).

Paths handed to containerd are opened on the host, not in the Pod; so is the `fsb-init` binary
bind-mounted into every sandbox. It is copied from the agent's image into the state dir, which
the Pod mounts from the host at the same path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastsandbox.agent.runtime._containerd_api import ContainerdApi
from fastsandbox.errors import Unavailable
from fastsandbox.settings import AgentSettings

log = logging.getLogger(__name__)

POD_UID_LABEL = "io.kubernetes.pod.uid"
KIND_LABEL = "io.cri-containerd.kind"


def slice_path(name: str) -> str:
    """A systemd slice's cgroupfs path: `a-b.slice` → `/a.slice/a-b.slice`."""
    parts = name.removesuffix(".slice").split("-")
    return "".join("/" + "-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def pod_cgroup(cgroups_path: str) -> str:
    """The Pod's cgroup from its sandbox container's `linux.cgroupsPath`."""
    if ":" in cgroups_path and not cgroups_path.startswith("/"):
        slice_name = cgroups_path.split(":", 1)[0]  # systemd driver: slice:prefix:name
        return slice_path(slice_name)
    return str(Path(cgroups_path).parent)


def read_pod_sandbox(spec: dict[str, Any]) -> tuple[str, str]:
    """(network namespace path, Pod cgroup) from the Pod sandbox's runtime spec."""
    linux = spec.get("linux") or {}
    netns = next(
        (ns.get("path") for ns in linux.get("namespaces") or () if ns.get("type") == "network"),
        None,
    )
    cgroups_path = linux.get("cgroupsPath") or ""
    if not netns or not cgroups_path:
        raise Unavailable(
            "the Pod sandbox's runtime spec names no network namespace path or cgroup "
            f"(netns {netns!r}, cgroupsPath {cgroups_path!r}): host-network Pods are not supported"
        )
    return str(netns), pod_cgroup(str(cgroups_path))


def stage_init(init_path: Path, state_dir: Path, name: str = "fsb-init") -> Path:
    """Copy `fsb-init` (or another helper the host runs, e.g. `fsb-logger`) into `state_dir`
    (atomically: running sandboxes may have the old copy mounted) and return the copy's path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    target = state_dir / name
    tmp = state_dir / f".{name}.{os.getpid()}"
    shutil.copyfile(init_path, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target


async def join_pod(settings: AgentSettings) -> AgentSettings:
    """`settings` with the Pod's network namespace, cgroup and a host-visible fsb-init."""
    assert settings.pod_uid
    api = ContainerdApi(settings.containerd_socket, settings.containerd_namespace)
    selector = f"labels.{json.dumps(POD_UID_LABEL)}=={json.dumps(settings.pod_uid)}"
    selector += f',labels.{json.dumps(KIND_LABEL)}=="sandbox"'
    try:
        found = await api.list_containers([selector])
    finally:
        await api.close()
    if not found:
        raise Unavailable(
            f"no CRI sandbox for Pod uid {settings.pod_uid} in containerd namespace "
            f"{settings.containerd_namespace} at {settings.containerd_socket}: the agent must run "
            "in a Pod on this node's containerd (CRI), with --containerd-namespace k8s.io"
        )
    try:
        spec = json.loads(found[0].spec.value or b"{}")
    except ValueError as exc:
        raise Unavailable(f"unreadable runtime spec of the Pod sandbox {found[0].id}") from exc
    netns, cgroup = read_pod_sandbox(spec)
    init = stage_init(settings.init_path, settings.state_dir) if settings.init_path else None
    logger = (
        stage_init(settings.logger_path, settings.state_dir, "fsb-logger")
        if settings.logger_path
        else None
    )
    log.info(
        "joined the Pod",
        extra={
            "agent": settings.name,
            "pod_sandbox": found[0].id,
            "netns": netns,
            "cgroup_parent": cgroup,
            "init_path": str(init) if init else None,
        },
    )
    return replace(
        settings, netns_path=netns, cgroup_parent=cgroup, init_path=init, logger_path=logger
    )
