"""The agent Pod the Kubernetes fleet makes (pure: no apiserver), and how an agent in a Pod finds
its Pod's network namespace and cgroup."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from lightkube.resources.core_v1 import Pod

from fastsandbox.agent.args import AgentArgs
from fastsandbox.agent.pod import pod_cgroup, read_pod_sandbox, slice_path, stage_init
from fastsandbox.api.models import (
    ObjectMeta,
    SandboxLimits,
    SandboxPool,
    SandboxPoolSpec,
    SandboxResources,
)
from fastsandbox.cli.commands.agent import parse
from fastsandbox.control.limits import effective_limits
from fastsandbox.errors import Unavailable
from fastsandbox.fleet.kubernetes import KubernetesFleet
from fastsandbox.fleet.kubernetes_manifest import merge_template, version_label


def fleet(**kwargs: Any) -> KubernetesFleet:
    return KubernetesFleet(cast(Any, None), agent_image="reg/agent:1", **kwargs)


def pool(**spec: Any) -> SandboxPool:
    return SandboxPool(
        metadata=ObjectMeta(name="p1", namespace="team", uid="uid-1"),
        spec=SandboxPoolSpec(**spec),
    )


def agent_container(manifest: dict[str, Any]) -> dict[str, Any]:
    (agent,) = [c for c in manifest["spec"]["containers"] if c["name"] == "agent"]
    return agent


def test_the_agent_pod() -> None:
    manifest = fleet(insecure_registries=["r:5000"]).pod_manifest(
        pool(max_sandboxes_per_agent=4, agent_version="v2", agent_resources={"cpu": "2"}),
        "p1-abcde",
    )
    Pod.from_dict(manifest)  # a valid Pod as far as the typed model can tell
    meta = manifest["metadata"]
    assert (meta["name"], meta["namespace"]) == ("p1-abcde", "team")
    assert meta["labels"] == {
        "app.kubernetes.io/name": "fastsandbox-agent",
        "fastsandbox.io/pool": "p1",
        "fastsandbox.io/agent-version": "v2",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "fastsandbox.io/v1alpha1",
            "kind": "SandboxPool",
            "name": "p1",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    agent = agent_container(manifest)
    assert agent["image"] == "reg/agent:1"
    for arg in (
        "--name=$(POD_NAME)",
        "--listen=$(POD_IP):7443",
        "--agent-ip=$(POD_IP)",
        "--pod-uid=$(POD_UID)",
        "--containerd-namespace=k8s.io",
        "--containerd-socket=/run/containerd/containerd.sock",
        "--state-dir=/var/lib/fastsandbox/agents/$(POD_NAME)",
        "--capacity=4",
        "--version=v2",
        "--insecure-registry=r:5000",
    ):
        assert arg in agent["args"]
    env = {e["name"]: e.get("valueFrom") for e in agent["env"]}
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # No shared token in the env: its own credentials, from a Secret of its own, read-only.
    assert "FSB_AGENT_TOKEN" not in env
    for arg in (
        "--token-file=/var/run/fastsandbox/agent/token",
        "--tls-cert=/var/run/fastsandbox/agent/tls.crt",
        "--tls-key=/var/run/fastsandbox/agent/tls.key",
    ):
        assert arg in agent["args"]
    mount = {"name": "credentials", "mountPath": "/var/run/fastsandbox/agent", "readOnly": True}
    assert mount in agent["volumeMounts"]
    assert agent["readinessProbe"]["tcpSocket"] == {"port": 7443}
    security = agent["securityContext"]
    # A private pool (the default): only what its sandboxes' rules in the Pod's own network
    # namespace need (docs/security.md); nothing else.
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert {"name": "XTABLES_LOCKFILE", "value": "/tmp/xtables.lock"} in agent["env"]
    assert "--forbid=$(HOST_IP)/32" in agent["args"]  # the node, even with egress allow
    assert {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}} in (
        agent["env"]
    )
    assert (security["privileged"], security["allowPrivilegeEscalation"]) == (False, False)
    assert agent["resources"] == {"requests": {"cpu": "2"}, "limits": {"cpu": "2"}}
    volumes = {v["name"]: v for v in manifest["spec"]["volumes"]}
    assert volumes["containerd-socket"]["hostPath"]["path"] == "/run/containerd/containerd.sock"
    # The state dir is mounted where it is on the host: containerd opens its paths there.
    assert {"name": "state", "mountPath": "/var/lib/fastsandbox"} in agent["volumeMounts"]
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/fastsandbox"
    assert manifest["spec"]["automountServiceAccountToken"] is False
    assert volumes["credentials"]["secret"] == {
        "secretName": "p1-abcde-credentials",
        "defaultMode": 0o400,
    }


def test_without_a_version_the_agent_reports_its_own() -> None:
    manifest = fleet().pod_manifest(pool(), "p1-abcde")
    assert "fastsandbox.io/agent-version" not in manifest["metadata"]["labels"]
    assert not any(a.startswith("--version") for a in agent_container(manifest)["args"])


def test_the_pod_args_are_what_fsb_agent_parses() -> None:
    manifest = fleet(insecure_registries=["r:5000"], grace_seconds=2.5).pod_manifest(
        pool(max_sandboxes_per_agent=4, agent_version="v2"), "p1-abcde"
    )
    command, *flags = agent_container(manifest)["args"]
    assert command == "agent"
    assert parse(flags) == AgentArgs(
        name="$(POD_NAME)",
        pool="p1",
        namespace="team",
        listen="$(POD_IP):7443",
        agent_ip="$(POD_IP)",
        state_dir=Path("/var/lib/fastsandbox/agents/$(POD_NAME)"),
        containerd_namespace="k8s.io",
        # The node's containerd state: its shim mounts the disk limit, the Pod cannot.
        containerd_state=Path("/run/containerd"),
        capacity=4,
        pod_uid="$(POD_UID)",
        network_mode="private",  # the pool's default, passed as it is
        forbid=("$(HOST_IP)/32",),
        insecure_registry=("r:5000",),
        grace=2.5,
        version="v2",
        log_format="json",
        token_file=Path("/var/run/fastsandbox/agent/token"),
        tls_cert=Path("/var/run/fastsandbox/agent/tls.crt"),
        tls_key=Path("/var/run/fastsandbox/agent/tls.key"),
        # Warm slots are made with what a create of the defaults asks (here the plane's own).
        slot_cpu_millis=1000,
        slot_memory_bytes=512 << 20,
        slot_pids=1024,
    )


def test_warm_slots_get_the_limits_a_create_of_the_pools_defaults_asks_for() -> None:
    """The pool's sandboxDefaults where it sets them, else the control plane's defaults (as
    `effective_limits` gives a create that asks for none): that create claims a slot with no
    limit to change."""
    defaults = SandboxLimits(cpu="250m", memory="1Gi", pids=300, disk="4Gi", log_max_bytes=1 << 20)
    manifest = fleet(sandbox_defaults=defaults).pod_manifest(
        pool(warm_slots=1, sandbox_defaults={"memory": "128Mi", "pids": 64}), "p1-abcde"
    )
    args = parse(agent_container(manifest)["args"][1:])
    limits = effective_limits(
        SandboxResources(), pool(sandbox_defaults={"memory": "128Mi", "pids": 64}).spec, defaults
    )
    assert (args.slot_cpu_millis, args.slot_memory_bytes, args.slot_pids) == (250, 128 << 20, 64)
    assert (limits.cpu_millis, limits.memory_bytes, limits.pids) == (250, 128 << 20, 64)
    assert (args.default_disk_bytes, args.log_max_bytes) == (4 << 30, 1 << 20)
    assert (limits.disk_bytes, limits.log_max_bytes) == (4 << 30, 1 << 20)


def test_the_pool_template_sets_placement_and_the_agents_resources_only() -> None:
    template = {
        "metadata": {"labels": {"team": "a"}},
        "spec": {
            "nodeSelector": {"disk": "ssd"},
            "tolerations": [{"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
                }
            },
            "imagePullSecrets": [{"name": "regcred"}],
            "priorityClassName": "sandboxes",
            "containers": [{"name": "agent", "resources": {"limits": {"memory": "1Gi"}}}],
        },
    }
    plain = fleet().pod_manifest(pool(), "p1-abcde")
    manifest = fleet().pod_manifest(pool(agent_template=template), "p1-abcde")
    assert manifest["metadata"]["labels"]["team"] == "a"
    assert manifest["metadata"]["labels"]["fastsandbox.io/pool"] == "p1"
    assert manifest["metadata"]["namespace"] == "team"
    spec = manifest["spec"]
    assert spec["nodeSelector"] == {"disk": "ssd"}
    assert spec["tolerations"] == template["spec"]["tolerations"]
    assert spec["affinity"] == template["spec"]["affinity"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["priorityClassName"] == "sandboxes"
    assert agent_container(manifest)["resources"] == {"limits": {"memory": "1Gi"}}
    # Nothing else moved: same containers, volumes, securityContext, args, image.
    for key in ("containers", "volumes", "automountServiceAccountToken", "restartPolicy"):
        if key != "containers":
            assert spec[key] == plain["spec"][key], key
    ours, theirs = agent_container(plain), agent_container(manifest)
    assert {k: v for k, v in theirs.items() if k != "resources"} == {
        k: v for k, v in ours.items() if k != "resources"
    }
    assert [c["name"] for c in spec["containers"]] == ["agent"]
    Pod.from_dict(manifest)


def test_a_pool_in_another_namespace_than_the_controllers_is_refused() -> None:
    import asyncio

    from fastsandbox.errors import InvalidArgument

    scoped = fleet(watch_namespace="team-b")
    with pytest.raises(InvalidArgument, match="namespace team-b"):
        asyncio.run(scoped.start_agent(pool(), "p1-abcde"))


def test_version_labels() -> None:
    assert version_label("v1.2.3") == "v1.2.3"
    odd = version_label("1.0+build 7")
    assert odd.startswith("1.0-build-7-") and len(odd) <= 63
    assert len(version_label("x" * 100)) <= 63
    assert version_label("+++") != version_label("---")


def test_merge_without_template_is_identity() -> None:
    pod: dict[str, Any] = {"metadata": {}, "spec": {"containers": [{"name": "agent"}]}}
    assert merge_template(None, pod) is pod


def test_pod_cgroup_from_the_sandbox_cgroups_path() -> None:
    assert pod_cgroup("/kubepods/besteffort/pod123/abc") == "/kubepods/besteffort/pod123"
    assert slice_path("kubepods-besteffort-pod1_2.slice") == (
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice"
    )
    assert pod_cgroup("kubepods-burstable-pod9.slice:cri-containerd:abc") == (
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod9.slice"
    )


def test_read_pod_sandbox() -> None:
    spec = {
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}],
            "cgroupsPath": "/kubepods/pod1/sb",
        }
    }
    assert read_pod_sandbox(spec) == ("/var/run/netns/cni-1", "/kubepods/pod1")
    with pytest.raises(Unavailable, match="host-network"):
        read_pod_sandbox({"linux": {"namespaces": [{"type": "network"}], "cgroupsPath": "/a/b"}})


def test_stage_init_copies_atomically(tmp_path: Path) -> None:
    source = tmp_path / "fsb-init"
    source.write_bytes(b"\x7fELF one")
    state = tmp_path / "state"
    staged = stage_init(source, state)
    assert staged == state / "fsb-init"
    assert staged.read_bytes() == b"\x7fELF one" and staged.stat().st_mode & 0o111
    source.write_bytes(b"\x7fELF two")
    assert stage_init(source, state).read_bytes() == b"\x7fELF two"
    assert sorted(p.name for p in state.iterdir()) == ["fsb-init"]


def test_a_shared_pool_agent_keeps_no_capability() -> None:
    manifest = fleet().pod_manifest(pool(network_mode="shared"), "p1-abcde")
    security = agent_container(manifest)["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert (security["privileged"], security["readOnlyRootFilesystem"]) == (False, True)
