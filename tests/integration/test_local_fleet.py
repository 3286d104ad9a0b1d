"""The local fleet with real agent processes (`python -m fastsandbox.agent`) on a real containerd:
each agent in its own CNI network namespace, restarted when it crashes, adopted or restarted with
the same IP by the next server, and removed without a trace."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastsandbox.api.models import ObjectMeta, SandboxPool, SandboxPoolSpec
from fastsandbox.control.agent_client import AgentClient
from fastsandbox.errors import FsbError
from fastsandbox.fleet import netns
from fastsandbox.fleet.base import AgentHandle
from fastsandbox.fleet.local import LocalFleet, purge
from fastsandbox.fleet.netns import CniNetwork
from tests.infra import ContainerdProc
from tests.integration._testnet import TEST_SUBNET, ip, make_network, remove_bridge, require_cni

pytestmark = pytest.mark.integration

# A bound on waiting for real processes; generous because the machine may be busy.
TIMEOUT = 30.0
POOL = SandboxPool(
    metadata=ObjectMeta(name="fleet-pool"), spec=SandboxPoolSpec(max_sandboxes_per_agent=3)
)

# A server that starts one agent and dies without closing its fleet (as after kill -9).
CRASHING_SERVER = """
import asyncio, json, os, sys
from pathlib import Path
from fastsandbox.api.models import ObjectMeta, SandboxPool
from fastsandbox.fleet.local import LocalFleet
from fastsandbox.fleet.netns import CniNetwork

cfg = json.loads(sys.argv[1])

async def main():
    fleet = LocalFleet(
        data_dir=Path(cfg["data_dir"]),
        containerd_socket=Path(cfg["socket"]),
        network="cni",
        cni=CniNetwork(**{**cfg["cni"], "ipam_dir": Path(cfg["cni"]["ipam_dir"])}),
        cgroup_parent=cfg["cgroup_parent"],
    )
    await fleet.start()
    await fleet.start_agent(SandboxPool(metadata=ObjectMeta(name=cfg["pool"])), cfg["name"])
    os._exit(0)

asyncio.run(main())
"""


@dataclass
class Env:
    data_dir: Path
    network: CniNetwork
    new_fleet: Callable[..., LocalFleet]
    containerd: ContainerdProc
    cgroup_parent: str

    def state(self, name: str) -> dict[str, object]:
        loaded: dict[str, object] = json.loads(
            (self.data_dir / "agents" / name / "agent.json").read_text()
        )
        return loaded

    def pid(self, name: str) -> int:
        return int(str(self.state(name)["pid"]))


@pytest.fixture
async def env(containerd: ContainerdProc, cgroup_parent: str) -> AsyncIterator[Env]:
    require_cni()
    # Short on purpose: agent sockets live under the data dir (unix paths < 108 bytes).
    root = Path(tempfile.mkdtemp(prefix="fsbf-"))
    network = make_network(root)
    fleets: list[LocalFleet] = []

    def new_fleet(mode: str = "cni") -> LocalFleet:
        fleet = LocalFleet(
            data_dir=root / "data",
            containerd_socket=containerd.socket,
            network=mode,
            cni=network,
            cgroup_parent=cgroup_parent,
            grace_seconds=1,
        )
        fleets.append(fleet)
        return fleet

    try:
        yield Env(root / "data", network, new_fleet, containerd, cgroup_parent)
    finally:
        for fleet in fleets:
            await fleet.close()
        await purge(root / "data", network)
        shutil.rmtree(root, ignore_errors=True)
        remove_bridge()


async def status_name(handle: AgentHandle) -> str:
    """Wait until the agent answers Status; returns the name it reports."""
    socket = Path(handle.target.removeprefix("unix://"))
    deadline = time.monotonic() + TIMEOUT
    while True:
        # The agent makes its socket only once it serves; a fresh channel per try avoids
        # gRPC's reconnect backoff from an early failed attempt.
        if socket.exists():
            client = AgentClient(handle.target)
            try:
                return (await client.status(timeout=2)).agent_name
            except FsbError:
                pass
            finally:
                await client.close()
        if time.monotonic() > deadline:
            pytest.fail(f"agent {handle.name} did not answer Status within {TIMEOUT}s")
        await asyncio.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


async def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_agent_runs_in_its_own_namespace_and_is_restarted_after_a_crash(env: Env) -> None:
    fleet = env.new_fleet()
    assert await fleet.start() == []
    handle = await fleet.start_agent(POOL, "crashy")
    assert await status_name(handle) == "crashy"

    assert handle.ip in ip("-n", "fsb-crashy", "-4", "-o", "addr")
    assert ipaddress.ip_address(handle.ip) in ipaddress.ip_network(TEST_SUBNET)
    state = env.state("crashy")
    assert (state["ip"], state["netns"], state["capacity"]) == (handle.ip, "fsb-crashy", 3)
    assert handle.target == f"unix://{env.data_dir / 'agents' / 'crashy' / 'agent.sock'}"

    first = env.pid("crashy")
    os.kill(first, signal.SIGKILL)
    await wait_for("a new agent process", lambda: env.pid("crashy") != first)
    assert await status_name(handle) == "crashy"
    assert gone(first)
    assert [(a.name, a.ip) for a in await fleet.agents()] == [("crashy", handle.ip)]
    assert await netns.current_ip("fsb-crashy") == handle.ip


async def test_next_fleet_restarts_closed_agents_with_the_same_ip(env: Env) -> None:
    fleet = env.new_fleet()
    await fleet.start()
    handle = await fleet.start_agent(POOL, "keeper")
    await status_name(handle)
    pid = env.pid("keeper")

    await fleet.close()
    assert gone(pid)
    assert netns.exists("fsb-keeper")  # kept: sandboxes may still run in it

    again = await env.new_fleet().start()
    assert again == [handle]
    assert env.pid("keeper") != pid
    assert await status_name(again[0]) == "keeper"


async def test_next_fleet_adopts_agents_of_a_killed_server(env: Env) -> None:
    cfg = {
        "data_dir": str(env.data_dir),
        "socket": str(env.containerd.socket),
        "cni": {
            "name": env.network.name,
            "bridge": env.network.bridge,
            "subnet": env.network.subnet,
            "ipam_dir": str(env.network.ipam_dir),
        },
        "cgroup_parent": env.cgroup_parent,
        "pool": POOL.metadata.name,
        "name": "orphan",
    }
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_SERVER, json.dumps(cfg)
    )
    assert await asyncio.wait_for(server.wait(), TIMEOUT) == 0
    pid = env.pid("orphan")
    assert not gone(pid)

    fleet = env.new_fleet()
    [handle] = await fleet.start()
    assert (handle.name, handle.ip) == ("orphan", env.state("orphan")["ip"])
    assert env.pid("orphan") == pid  # adopted, not restarted
    assert await status_name(handle) == "orphan"

    # Supervised like its own children: a crash of the adopted agent is repaired too.
    os.kill(pid, signal.SIGKILL)
    await wait_for("a new agent process", lambda: env.pid("orphan") != pid)
    assert await status_name(handle) == "orphan"


async def test_stop_agent_leaves_nothing_behind(env: Env) -> None:
    fleet = env.new_fleet()
    await fleet.start()
    handle = await fleet.start_agent(POOL, "goner")
    await status_name(handle)
    pid = env.pid("goner")

    await fleet.stop_agent("goner")

    assert gone(pid)
    assert not netns.exists("fsb-goner")
    assert not (env.data_dir / "agents" / "goner").exists()
    assert list((env.network.ipam_dir / env.network.name).glob("10.*")) == []
    assert await fleet.agents() == []
    assert await env.new_fleet().start() == []


async def test_host_network_fallback(env: Env) -> None:
    fleet = env.new_fleet("host")
    await fleet.start()
    handle = await fleet.start_agent(POOL, "hosted")

    assert handle.ip == "127.0.0.1"
    assert await status_name(handle) == "hosted"
    assert env.state("hosted")["netns"] == ""
    assert not netns.exists("fsb-hosted")
