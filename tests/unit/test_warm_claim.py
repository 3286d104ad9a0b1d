"""A warm slot's spec, and what a claim rewrites: the record must read as the cold spec of the
same sandbox (capabilities and seccomp too: a slot's PID 1 had more, for the hostname)."""

from __future__ import annotations

from typing import Any

import pytest

from fastsandbox.agent.runtime.oci_spec import build_oci_spec, linux_resources
from fastsandbox.agent.runtime.warm_claim import claimed_oci, limits_fixed

INIT = "/opt/fsb-supervisor"
CHANNEL_ENV = ["FSB_CHANNEL=/.fsb/run", "FSB_SANDBOX_ID=w-1"]


def spec(container_id: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("args", ["sh", "-c", "true"])
    kw.setdefault("env", ["PATH=/bin", "A=1"])
    kw.setdefault("cwd", "/work")
    return build_oci_spec(
        container_id=container_id,
        cgroups_path=f"/fastsandbox/agent-1/{container_id}",
        machine="x86_64",
        init_path=INIT,
        channel_dir=f"/state/channels/{container_id}",
        init_env=CHANNEL_ENV,
        **kw,
    )


def test_a_warm_slot_waits_with_a_bare_command_line() -> None:
    s = spec("w-1", args=[], warm=True)
    assert s["process"]["args"] == ["/.fsb/init"]
    assert s["process"]["env"] == ["PATH=/bin", "A=1", *CHANNEL_ENV, "FSB_WARM=1"]
    with pytest.raises(ValueError, match="warm"):
        build_oci_spec(
            container_id="w", args=[], env=[], cwd="/", cgroups_path="/x", warm=True,
            init_path=INIT,
        )  # fmt: skip


def test_a_claimed_record_reads_as_the_cold_spec() -> None:
    argv, env = ["python", "app.py"], ["PATH=/bin", "A=2", "B=3"]
    resources = linux_resources(500, 256 << 20, 128)
    cold = spec("sb-9", args=argv, env=env, cwd="/srv", cpu_millis=500, memory_bytes=256 << 20,
                pids_limit=128)  # fmt: skip
    warm = spec("w-1", args=[], warm=True)
    claimed = claimed_oci(
        warm, sandbox_id="sb-9", argv=argv, env=env, cwd="/srv", resources=resources
    )
    assert claimed["process"]["args"] == cold["process"]["args"] == ["/.fsb/init"]
    assert claimed["process"]["env"] == cold["process"]["env"]
    assert claimed["process"]["cwd"] == "/srv"
    assert claimed["hostname"] == cold["hostname"] == "sb-9"
    assert claimed["linux"]["resources"] == cold["linux"]["resources"]
    # What stays the slot's: its cgroup and channel (named by its container id).
    assert claimed["linux"]["cgroupsPath"] == "/fastsandbox/agent-1/w-1"
    assert warm["process"]["args"] == ["/.fsb/init"]  # the input is not changed


def test_only_a_warm_slot_gives_pid1_cap_sys_admin_and_sethostname() -> None:
    cold, warm = spec("sb-1"), spec("w-1", args=[], warm=True)
    for kind in ("bounding", "effective", "permitted"):
        assert "CAP_SYS_ADMIN" not in cold["process"]["capabilities"][kind]
        assert warm["process"]["capabilities"][kind] == [
            *cold["process"]["capabilities"][kind],
            "CAP_SYS_ADMIN",
        ]
    # Never inheritable or ambient: nothing PID 1 starts could receive it through exec.
    assert set(warm["process"]["capabilities"]) == {"bounding", "effective", "permitted"}

    def allowed(s: dict[str, Any]) -> set[str]:
        return {
            n
            for rule in s["linux"]["seccomp"]["syscalls"]
            if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
            for n in rule["names"]
        }

    # The one syscall the supervisor's helper needs; none of what else CAP_SYS_ADMIN opens.
    assert allowed(warm) - allowed(cold) == {"sethostname"}


def test_a_claimed_record_holds_the_cold_capabilities_and_seccomp() -> None:
    cold = spec("sb-9", args=["true"])
    claimed = claimed_oci(
        spec("w-1", args=[], warm=True), sandbox_id="sb-9", argv=["true"], env=[], cwd="/",
        resources=cold["linux"]["resources"],
    )  # fmt: skip
    assert claimed["process"]["capabilities"] == cold["process"]["capabilities"]
    assert claimed["linux"]["seccomp"] == cold["linux"]["seccomp"]


def test_limits_are_fixed_only_under_gvisor() -> None:
    assert limits_fixed("gvisor") and not limits_fixed("runc")
