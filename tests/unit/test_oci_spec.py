"""The sandbox OCI spec is secure by default: pure-function checks of build_oci_spec."""

from __future__ import annotations

from typing import Any

import pytest

from fastsandbox.agent.runtime.oci_spec import (
    CTR_DEFAULT_CAPABILITIES,
    DEFAULT_PIDS_LIMIT,
    build_oci_spec,
    cpu_quota_us,
    cpu_shares,
)
from fastsandbox.agent.runtime.seccomp import seccomp_profile


def spec(**kw: Any) -> dict[str, Any]:
    kw.setdefault("container_id", "sb-1")
    kw.setdefault("args", ["sh", "-c", "true"])
    kw.setdefault("env", ["PATH=/bin"])
    kw.setdefault("cwd", "/work")
    kw.setdefault("cgroups_path", "/fastsandbox/agent-1/sb-1")
    return build_oci_spec(machine="x86_64", **kw)


def test_process_fields() -> None:
    p = spec(uid=1000, gid=1001)["process"]
    assert p["args"] == ["sh", "-c", "true"]
    assert p["env"] == ["PATH=/bin"]
    assert p["cwd"] == "/work"
    assert p["user"] == {"uid": 1000, "gid": 1001}
    assert p["terminal"] is False


def test_dangerous_capabilities_are_dropped() -> None:
    caps = spec()["process"]["capabilities"]
    for kind in ("bounding", "effective", "permitted"):
        assert not {"CAP_NET_RAW", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP"} & set(caps[kind])
        assert "CAP_SYS_ADMIN" not in caps[kind]
        assert set(caps[kind]) < set(CTR_DEFAULT_CAPABILITIES)
        assert {"CAP_CHOWN", "CAP_SETUID", "CAP_NET_BIND_SERVICE", "CAP_KILL"} <= set(caps[kind])
    assert "ambient" not in caps and "inheritable" not in caps


def test_no_new_privileges() -> None:
    assert spec()["process"]["noNewPrivileges"] is True


def test_seccomp_is_the_allowlist_profile() -> None:
    # The profile's own properties are pinned in test_seccomp.py.
    profile = spec()["linux"]["seccomp"]
    assert profile == seccomp_profile("x86_64")
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"


def test_resource_limits() -> None:
    r = spec(cpu_millis=500, memory_bytes=256 << 20, pids_limit=64)["linux"]["resources"]
    assert r["cpu"] == {"quota": 50_000, "period": 100_000, "shares": 512}
    # swap == limit: no swap beyond the memory limit, so a hog meets the OOM killer.
    assert r["memory"] == {"limit": 256 << 20, "swap": 256 << 20}
    assert r["pids"] == {"limit": 64}
    assert r["devices"] == [{"allow": False, "access": "rwm"}]


@pytest.mark.parametrize("pids", [0, -1])
def test_a_pids_limit_cannot_be_switched_off(pids: int) -> None:
    with pytest.raises(ValueError, match="pids limit"):
        spec(pids_limit=pids)


@pytest.mark.parametrize(("millis", "shares"), [(10, 10), (1, 2), (1000, 1024), (2500, 2560)])
def test_cpu_shares(millis: int, shares: int) -> None:
    assert cpu_shares(millis) == shares


def test_no_limits_when_none_given() -> None:
    r = spec()["linux"]["resources"]
    assert "cpu" not in r and "memory" not in r
    assert r["pids"]["limit"] == DEFAULT_PIDS_LIMIT


@pytest.mark.parametrize(("millis", "quota"), [(1, 1_000), (250, 25_000), (2000, 200_000)])
def test_cpu_quota(millis: int, quota: int) -> None:
    assert cpu_quota_us(millis) == quota


def test_namespaces_join_the_agent_netns() -> None:
    ns = spec(netns_path="/var/run/netns/fsb-agent-1")["linux"]["namespaces"]
    assert {"type": "network", "path": "/var/run/netns/fsb-agent-1"} in ns
    assert {n["type"] for n in ns} == {"pid", "ipc", "uts", "mount", "network"}


def test_host_network_when_no_netns() -> None:
    ns = spec()["linux"]["namespaces"]
    assert {n["type"] for n in ns} == {"pid", "ipc", "uts", "mount"}


def test_cgroup_hostname_and_paths() -> None:
    s = spec(container_id="x" * 80)
    assert s["linux"]["cgroupsPath"] == "/fastsandbox/agent-1/sb-1"
    assert s["hostname"] == "x" * 63
    assert "/proc/kcore" in s["linux"]["maskedPaths"]
    assert "/proc/sys" in s["linux"]["readonlyPaths"]
    assert {m["destination"] for m in s["mounts"]} >= {"/proc", "/dev", "/sys", "/dev/pts"}
    sys_mount = next(m for m in s["mounts"] if m["destination"] == "/sys")
    assert "ro" in sys_mount["options"]


def test_a_command_is_required() -> None:
    with pytest.raises(ValueError, match="command"):
        spec(args=[])


def test_fsb_init_runs_in_front_of_the_command_read_only() -> None:
    s = spec(args=["sleep", "1"], init_path="/opt/fsb-init")
    # The command travels in PID 1's environment, which sandbox code cannot read; its command
    # line (which it can) is the same for every sandbox, warm or cold.
    assert s["process"]["args"] == ["/.fsb/init"]
    assert s["process"]["env"][-1] == 'FSB_MAIN=["sleep", "1"]'
    mount = next(m for m in s["mounts"] if m["destination"] == "/.fsb/init")
    assert mount["source"] == "/opt/fsb-init"
    assert "ro" in mount["options"] and "nosuid" in mount["options"]
    assert spec(args=["sleep", "1"])["process"]["args"] == ["sleep", "1"]


def test_supervisor_channel_mounted_read_only_with_its_env() -> None:
    s = spec(
        args=[],
        env=["PATH=/bin"],
        init_path="/opt/fsb-supervisor",
        channel_dir="/state/channels/sb-1",
        init_env=["FSB_CHANNEL=/.fsb/run", "FSB_SANDBOX_ID=sb-1"],
    )
    # No command: the supervisor alone keeps the sandbox up, idle.
    assert s["process"]["args"] == ["/.fsb/init"]
    assert s["process"]["env"] == ["PATH=/bin", "FSB_CHANNEL=/.fsb/run", "FSB_SANDBOX_ID=sb-1"]
    mount = next(m for m in s["mounts"] if m["destination"] == "/.fsb/run")
    assert mount["source"] == "/state/channels/sb-1" and "ro" in mount["options"]


def test_process_defaults_leave_out_the_supervisor_env() -> None:
    from fastsandbox.agent.runtime.container_state import process_defaults_of

    s = spec(
        args=["sh"],
        env=["A=1"],
        cwd="/w",
        uid=1000,
        gid=1000,
        init_path="/i",
        channel_dir="/c",
        init_env=["FSB_SUPERVISOR_SECRET=ab"],
    )
    d = process_defaults_of(s)
    assert (d.env, d.cwd, d.user) == (("A=1",), "/w", "1000:1000")


def test_gvisor_host_pids_limit_leaves_room_for_the_sentry() -> None:
    from fastsandbox.agent.runtime.oci_spec import host_pids_limit

    assert host_pids_limit(64, "runc") == 64
    # Each guest process costs the ptrace platform ~8 host pids, plus the Sentry's threads.
    assert host_pids_limit(64, "gvisor") > 8 * 64
    assert host_pids_limit(1, "gvisor") > host_pids_limit(1, "runc")


def test_a_hooked_network_is_a_fresh_namespace_wired_before_the_process_runs() -> None:
    hook = ("/var/lib/fastsandbox/agents/a1/fsb-nethook", "/var/run/netns/cni-1", "fv1", "g", "a")
    s = spec(netns_hook=hook)
    assert {"type": "network"} in s["linux"]["namespaces"]  # runc makes it: no path
    (entry,) = s["hooks"]["createRuntime"]
    assert entry["path"] == hook[0] and entry["args"] == list(hook)
    assert entry["env"] == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    assert entry["timeout"] > 0
    assert "hooks" not in spec()
    with pytest.raises(ValueError, match="network namespace"):
        spec(netns_hook=hook, netns_path="/var/run/netns/x")
    with pytest.raises(ValueError, match="absolute"):
        spec(netns_hook=("fsb-nethook",))
