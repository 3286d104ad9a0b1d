"""A warm slot's spec, and what a claim rewrites: the record must read as the cold spec of the
same sandbox, and the cgroup files get what runc would have written for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fastsandbox.agent.runtime.oci_spec import build_oci_spec, linux_resources
from fastsandbox.agent.runtime.warm_claim import cgroup_writes, claimed_oci, cpu_weight
from fastsandbox.agent.warm import can_claim

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


def test_cgroup_v1_writes_in_runc_order(tmp_path: Path) -> None:
    mem = tmp_path / "memory" / "fsb" / "w-1"
    mem.mkdir(parents=True)
    (mem / "memory.memsw.limit_in_bytes").write_text("max")
    writes = cgroup_writes("/fsb/w-1", linux_resources(250, 1 << 30, 64), tmp_path)
    assert [(p.relative_to(tmp_path).as_posix(), v) for p, v in writes] == [
        ("memory/fsb/w-1/memory.limit_in_bytes", str(1 << 30)),
        ("memory/fsb/w-1/memory.memsw.limit_in_bytes", str(1 << 30)),
        ("cpu/fsb/w-1/cpu.shares", "256"),
        ("cpu/fsb/w-1/cpu.cfs_period_us", "100000"),
        ("cpu/fsb/w-1/cpu.cfs_quota_us", "25000"),
        ("pids/fsb/w-1/pids.max", "64"),
    ]
    # No cpu or memory asked: only the pids limit (always set) is written.
    assert [v for _, v in cgroup_writes("/fsb/w-1", linux_resources(None, None, 8), tmp_path)] == [
        "8"
    ]


def test_cgroup_v2_writes(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids")
    base = tmp_path / "fsb" / "w-1"
    base.mkdir(parents=True)
    (base / "memory.swap.max").write_text("max")
    writes = dict(
        (p.name, v)
        for p, v in cgroup_writes("fsb/w-1", linux_resources(1000, 1 << 20, 9), tmp_path)
    )
    assert writes == {
        "memory.max": str(1 << 20),
        "memory.swap.max": "0",
        "cpu.weight": str(cpu_weight(1024)),
        "cpu.max": "100000 100000",
        "pids.max": "9",
    }
    assert cpu_weight(2) == 1 and cpu_weight(262144) == 10000


def test_claims_need_cap_sys_admin(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert can_claim(status)
    status.write_text("Name:\tx\nCapEff:\t00000000a80425fb\n")  # containerd's default set
    assert not can_claim(status)
    assert not can_claim(tmp_path / "missing")
