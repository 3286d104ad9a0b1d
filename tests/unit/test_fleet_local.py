"""The local fleet's pure parts: the agent command line it builds (checked against the agent's
own parser, so the two cannot drift apart), socket paths, and the CNI network config."""

from __future__ import annotations

import json
from pathlib import Path

from fastsandbox.agent.cli import settings_from_args
from fastsandbox.cli.commands.agent import parse
from fastsandbox.fleet.local import MAX_SOCKET_PATH, AgentState, LocalFleet
from fastsandbox.fleet.netns import CniNetwork
from fastsandbox.settings import LogSettings


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
