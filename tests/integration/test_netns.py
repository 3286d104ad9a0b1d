"""Agent network namespaces through the real CNI bridge + host-local plugins."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from fastsandbox.fleet import netns
from fastsandbox.fleet.netns import CniNetwork
from tests.integration._testnet import (
    TEST_SUBNET,
    bridge_exists,
    ip,
    make_network,
    remove_bridge,
    require_cni,
)

pytestmark = pytest.mark.integration

# Prints "ready" once listening, answers one connection with "hello", exits.
LISTENER = """
import socket, sys
s = socket.socket()
s.bind(("0.0.0.0", 0))
s.listen()
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.sendall(b"hello")
c.close()
"""


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[CniNetwork]:
    require_cni()
    yield make_network(tmp_path)
    remove_bridge()


@pytest.fixture
async def new_name(network: CniNetwork) -> AsyncIterator[Callable[[], str]]:
    """Hands out namespace names and removes every one of them afterwards."""
    names: list[str] = []

    def make() -> str:
        names.append(f"{netns.NETNS_PREFIX}t-{secrets.token_hex(3)}")
        return names[-1]

    yield make
    for name in names:
        await netns.remove(name, network)


def reservations(net: CniNetwork) -> dict[str, str]:
    """IP -> owner (container id) of host-local's reservation files."""
    out = {}
    for path in (net.ipam_dir / net.name).glob("*"):
        if path.name[0].isdigit():
            out[path.name] = path.read_text().splitlines()[0]
    return out


async def test_namespace_gets_an_ip_reachable_from_the_host(
    network: CniNetwork, new_name: Callable[[], str]
) -> None:
    name = new_name()
    addr = await netns.ensure(name, network)

    assert ipaddress.ip_address(addr) in ipaddress.ip_network(TEST_SUBNET)
    assert netns.exists(name)
    assert reservations(network) == {addr: name}
    assert "UP" in ip("-n", name, "-o", "link", "show", "lo").split(">")[0]

    listener = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", name, sys.executable, "-c", LISTENER,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert listener.stdout is not None
        port = int(await asyncio.wait_for(listener.stdout.readline(), 10))
        reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), 10)
        assert await asyncio.wait_for(reader.read(), 10) == b"hello"
        writer.close()
    finally:
        if listener.returncode is None:
            listener.kill()
        await listener.wait()


async def test_ensure_reuses_a_namespace_and_remakes_a_lost_one_with_the_same_ip(
    network: CniNetwork, new_name: Callable[[], str]
) -> None:
    name, other = new_name(), new_name()
    addr = await netns.ensure(name, network)
    assert await netns.ensure(name, network) == addr
    assert await netns.ensure(name, network, want_ip=addr) == addr

    # Lost behind our back (a reboot empties /var/run/netns): remade with the recorded IP.
    ip("netns", "delete", name)
    other_ip = await netns.ensure(other, network)  # host-local would hand out the next one
    assert await netns.ensure(name, network, want_ip=addr) == addr
    assert await netns.current_ip(name) == addr
    assert reservations(network) == {addr: name, other_ip: other}


async def test_remove_releases_address_and_namespace(
    network: CniNetwork, new_name: Callable[[], str]
) -> None:
    name = new_name()
    await netns.ensure(name, network)
    await netns.remove(name, network)

    assert not netns.exists(name)
    assert reservations(network) == {}
    await netns.remove(name, network)  # idempotent
    remove_bridge()
    assert not bridge_exists()


async def test_reservations_of_vanished_namespaces_are_collected(
    network: CniNetwork, new_name: Callable[[], str]
) -> None:
    gone, kept = new_name(), new_name()
    await netns.ensure(gone, network)
    kept_ip = await netns.ensure(kept, network)
    ip("netns", "delete", gone)

    assert netns.collect_stale_reservations(network) == 1
    assert reservations(network) == {kept_ip: kept}
