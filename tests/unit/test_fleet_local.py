"""The local fleet's pure parts: the agent command line it builds (checked against the agent's
own parser, so the two cannot drift apart), socket paths, and the CNI network config."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from fastsandbox.agent.cli import settings_from_args
from fastsandbox.api.models import ObjectMeta, SandboxPool, SandboxPoolSpec
from fastsandbox.cli.commands.agent import parse
from fastsandbox.control.limits import defaults_of
from fastsandbox.fleet.base import default_limit_args
from fastsandbox.fleet.local import MAX_SOCKET_PATH, AgentState, LocalFleet, _is_our_agent
from fastsandbox.fleet.netns import CniNetwork
from fastsandbox.settings import LogSettings, SandboxDefaults


def fleet(data_dir: Path) -> LocalFleet:
    return LocalFleet(
        data_dir=data_dir,
        containerd_socket=Path("/run/ctd.sock"),
        network="cni",
        insecure_registries=["127.0.0.1:5000", "reg.local:80"],
        grace_seconds=3,
        log=LogSettings(level="debug", format="json"),
        cgroup_parent="/fsb-x",
    )


def state(**overrides: object) -> AgentState:
    values: dict[str, object] = {
        "name": "p-1",
        "pool": "p",
        "namespace": "team",
        "ip": "10.209.0.7",
        "network": "cni",
        "netns": "fsb-p-1",
        "socket": "/d/agents/p-1/agent.sock",
        "runtime": "gvisor",
        "capacity": 4,
        "version": "v2",
        "pid": 0,
    }
    values.update(overrides)
    return AgentState(**values)  # type: ignore[arg-type]


def test_agent_argv_is_understood_by_the_agent(tmp_path: Path) -> None:
    f = fleet(tmp_path)
    argv = f._argv(state(), tmp_path / "agents" / "p-1")
    assert argv[1:3] == ["-m", "fastsandbox.agent"]

    s = settings_from_args(parse(argv[3:]))

    assert (s.name, s.pool, s.namespace) == ("p-1", "p", "team")
    assert s.listen == "unix:///d/agents/p-1/agent.sock"
    assert s.state_dir == tmp_path / "agents" / "p-1"
    assert s.containerd_socket == Path("/run/ctd.sock")
    assert (s.capacity, s.runtime, s.agent_ip) == (4, "gvisor", "10.209.0.7")
    assert s.netns_path == "/var/run/netns/fsb-p-1"
    assert s.cgroup_parent == "/fsb-x"
    assert s.insecure_registries == ["127.0.0.1:5000", "reg.local:80"]
    assert (s.delete_grace_seconds, s.version) == (3, "v2")
    assert (s.log.level, s.log.format) == ("debug", "json")


def test_the_agent_makes_warm_slots_with_the_pools_default_limits(tmp_path: Path) -> None:
    """What `start_agent` keeps in the state (the pool's defaults, else the plane's) reaches the
    agent's settings; a state file from before (no `limits`) gives the agent's own defaults."""
    pool = SandboxPool(
        metadata=ObjectMeta(name="p", namespace="team"),
        spec=SandboxPoolSpec(sandbox_defaults={"cpu": "250m", "pids": 64}),
    )
    limits = default_limit_args(pool, defaults_of(SandboxDefaults()))
    argv = fleet(tmp_path)._argv(state(limits=limits), tmp_path / "agents" / "p-1")
    s = settings_from_args(parse(argv[3:]))
    assert (s.slot_cpu_millis, s.slot_memory_bytes, s.slot_pids) == (250, 512 << 20, 64)
    assert s.default_disk_bytes == 1 << 30
    before = AgentState(**{k: v for k, v in asdict(state()).items() if k != "limits"})
    old = settings_from_args(parse(fleet(tmp_path)._argv(before, tmp_path / "a")[3:]))
    assert (old.slot_cpu_millis, old.slot_memory_bytes, old.slot_pids) == (None, None, None)


def test_host_network_agent_has_no_netns(tmp_path: Path) -> None:
    argv = fleet(tmp_path)._argv(
        state(network="host", netns="", ip="127.0.0.1", version=""), tmp_path
    )
    s = settings_from_args(parse(argv[3:]))
    assert (s.netns_path, s.agent_ip) == (None, "127.0.0.1")


def test_socket_path_stays_within_the_unix_limit(tmp_path: Path) -> None:
    f = fleet(tmp_path)
    short = f._socket_path(Path("/d/agents/a"))
    assert short == "/d/agents/a/agent.sock"

    deep = Path("/" + "x" * 100) / "agents" / "a"
    long_path = f._socket_path(deep)
    assert len(long_path.encode()) <= MAX_SOCKET_PATH
    assert long_path != f._socket_path(deep.parent / "b")


def test_cni_config_keeps_traffic_on_the_host() -> None:
    config = json.loads(CniNetwork(bridge="br9", subnet="10.1.2.0/24").config())
    assert config["type"] == "bridge"
    assert config["bridge"] == "br9"
    # No masquerading; the bridge address is set by us, so the plugin leaves ip_forward alone.
    assert (config["ipMasq"], config["isGateway"]) == (False, False)
    assert config["ipam"]["subnet"] == "10.1.2.0/24"
    assert "routes" not in config["ipam"]
    assert CniNetwork(subnet="10.1.2.0/24").gateway == "10.1.2.1/24"


@pytest.mark.parametrize("form", ["joined", "split"])
def test_adoption_knows_its_agents_by_state_dir(tmp_path: Path, form: str) -> None:
    """Agents now get `--state-dir=DIR`; ones started by older versions have `--state-dir DIR`
    and are adopted all the same. Another directory is another agent (pid reuse)."""
    mine = tmp_path / "agents" / "a1"
    flag = [f"--state-dir={mine}"] if form == "joined" else ["--state-dir", str(mine)]
    code = "import sys; print('up', flush=True); sys.stdin.read()"  # lives until stdin closes
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *flag], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"  # exec'd: /proc shows its own command line
        assert _is_our_agent(proc.pid, mine)
        assert not _is_our_agent(proc.pid, tmp_path / "agents" / "a2")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
