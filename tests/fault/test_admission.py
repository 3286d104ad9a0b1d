"""Admission under a flood (issue 12): `FSB_FAULT_CREATES` concurrent creates (500 with
`make fault`, 100 in `make test`) against a pool of two agents with `FSB_FAULT_CAPACITY` slots
in all (50 / 10): exactly that many are admitted, every other one is refused with
RESOURCE_EXHAUSTED (`CapacityExhausted`) and a message that says the pool is full; no two
sandboxes share a container or exceed an agent's slots. Then the same race for one port:
concurrent creates that all expose one port on two agents of a shared-network pool admit exactly
two (one per agent), never two owners of one agent's port.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import pytest

from fastsandbox.errors import CapacityExhausted, FsbError
from tests.e2e._server import Server
from tests.fault.conftest import drop_pool, make_pool, report, sdk_client, settled_leaks

pytestmark = pytest.mark.e2e

CREATES = int(os.environ.get("FSB_FAULT_CREATES", "100"))
CAPACITY = int(os.environ.get("FSB_FAULT_CAPACITY", "10"))
POOL = "flood"
PORT_POOL = "portrace"
PORT = 8080
PORT_CREATES = 40


async def _flood(
    server: Server, image: str, pool: str, count: int, ports: list[int]
) -> tuple[list[str], list[FsbError]]:
    admitted: list[str] = []
    refused: list[FsbError] = []
    async with sdk_client(server) as client:

        async def one(i: int) -> None:
            name = f"{pool}-{i}"
            try:
                await client.create(name, image, pool=pool, command=["sleep", "3600"], ports=ports)
            except FsbError as exc:
                refused.append(exc)
                return
            admitted.append(name)

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), 600)
    return admitted, refused


def _check_refusals(refused: list[FsbError], wanted: str) -> None:
    kinds = Counter(type(e).__name__ for e in refused)
    assert set(kinds) == {"CapacityExhausted"}, kinds
    for exc in refused:
        assert isinstance(exc, CapacityExhausted)
        assert wanted in exc.message, exc.message


def test_a_flood_admits_exactly_the_capacity(server: Server, demo_image: str) -> None:
    per_agent = CAPACITY // 2
    make_pool(server, POOL, agents=2, per_agent=per_agent)
    try:
        admitted, refused = asyncio.run(_flood(server, demo_image, POOL, CREATES, []))
        assert len(admitted) == 2 * per_agent, (len(admitted), Counter(map(str, refused)))
        assert len(refused) == CREATES - 2 * per_agent
        _check_refusals(refused, "is full")
        items = [i for i in server.fsb_json("list")["items"] if i["spec"]["poolRef"] == POOL]
        assert sorted(i["metadata"]["name"] for i in items) == sorted(admitted)
        per = Counter(i["status"]["assignedAgent"] for i in items)
        assert max(per.values()) <= per_agent, per
        inv, found = settled_leaks(server, (POOL,))
        report(
            "admission flood", inv, found, creates=CREATES, capacity=2 * per_agent,
            admitted=len(admitted), resource_exhausted=len(refused),
        )  # fmt: skip
    finally:
        drop_pool(server, POOL)


def test_a_port_race_admits_one_owner_per_agent(server: Server, demo_image: str) -> None:
    # Ports are exclusive per agent only where sandboxes share the agent's namespace; in a
    # private pool each sandbox publishes its own host port (tests/e2e/test_private_network.py).
    make_pool(server, PORT_POOL, agents=2, per_agent=8, network_mode="shared")
    try:
        admitted, refused = asyncio.run(_flood(server, demo_image, PORT_POOL, PORT_CREATES, [PORT]))
        assert len(admitted) == 2, admitted
        _check_refusals(refused, str(PORT))
        items = [i for i in server.fsb_json("list")["items"] if i["spec"]["poolRef"] == PORT_POOL]
        owners = Counter(i["status"]["assignedAgent"] for i in items)
        assert sorted(owners.values()) == [1, 1], owners
        inv, found = settled_leaks(server, (PORT_POOL,))
        report(
            "port race", inv, found, creates=PORT_CREATES, admitted=len(admitted),
            resource_exhausted=len(refused),
        )  # fmt: skip
    finally:
        drop_pool(server, PORT_POOL)
