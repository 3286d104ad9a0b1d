"""Warm slots under kill -9 (issue 12), against a real `fsb server`: a shared-network pool
keeps `WARM` warm slots of the demo image per agent (`agent/warm.py`), and

- the control plane gets SIGKILL during a storm of creates (which claim slots), execs and
  deletes: every acknowledged create is Running after the restart, and nothing leaks — no
  slot cut mid-claim left running without a record, no slot the agents do not report;
- an agent holding slots gets SIGKILL: the fleet starts it again, the new incarnation removes
  the slots its predecessor left (unclaimed: one may have been cut mid-claim) and makes fresh
  ones; none of the old ones survives, nothing leaks.

The leak check (`tests/fault/_leaks.py`) counts unclaimed slots (containers with the
warm-slot label) against what the pools' agents report ready, and flags a slot of no live
agent. `ROUNDS` rounds of both.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from tests.e2e._server import Server
from tests.fault.conftest import (
    ROUNDS,
    agent_pid,
    drop_pool,
    make_pool,
    ready_agents,
    report,
    settled_leaks,
    until,
    warm_ready,
)
from tests.fault.test_control_plane_kill import Storm, _delete_all, _storm

pytestmark = pytest.mark.e2e

POOL = "warm"
WARM = 2
AGENTS = 1  # one agent holds the slots; a second adds time, not coverage
BOUND = 90.0


def _running(server: Server, name: str) -> bool:
    got = server.fsb("get", name, "-o", "json")
    return got.returncode == 0 and '"phase": "Running"' in got.stdout


def test_kill9_with_warm_slots_leaks_none(server: Server, demo_image: str) -> None:
    make_pool(
        server, POOL, agents=AGENTS, per_agent=12, network_mode="shared",
        extra=("--prewarm-image", demo_image, "--warm-slots", str(WARM)),
    )  # fmt: skip
    rng = random.Random(42)
    totals = {"acked_creates": 0, "slots_replaced": 0}
    try:
        full = AGENTS * WARM
        until("the warm slots made", lambda: warm_ready(server, POOL) == full, BOUND)
        inv, found = settled_leaks(server, (POOL,))
        assert len(inv.warm) == full, inv.warm  # the check sees the slots it accounts for
        for r in range(ROUNDS):
            # 1. kill -9 of the control plane while creates claim slots.
            storm = Storm(server, demo_image, 1000 + r, rng.randint(4, 10), pool=POOL)
            asyncio.run(_storm(server, storm))
            assert storm.killed.is_set(), "the storm ended before the kill"
            server.stop()
            server.start()
            kept = storm.acked - storm.dying  # a delete without a reply may have happened
            for name in sorted(kept):
                until(f"acknowledged {name} Running", lambda n=name: _running(server, n), 30)
            inv, found = settled_leaks(server, (POOL,))
            report(
                f"warm slots, control-plane kill -9 round {r + 1}/{ROUNDS}", inv, found,
                acked_creates=len(storm.acked), acked_deletes=len(storm.deleted),
            )  # fmt: skip
            totals["acked_creates"] += len(storm.acked)
            present = {i["metadata"]["name"] for i in server.fsb_json("list")["items"]}
            asyncio.run(_delete_all(server, present))
            until("the warm slots made again", lambda: warm_ready(server, POOL) == full, BOUND)

            # 2. kill -9 of an agent that holds slots.
            inv, _ = settled_leaks(server, (POOL,))
            victim = sorted(inv.warm.values())[0]
            old = {cid for cid, agent in inv.warm.items() if agent == victim}
            pid = agent_pid(server, victim)
            os.kill(pid, signal.SIGKILL)
            until(
                "the agent started again",
                lambda v=victim, p=pid: _restarted(server, v, p),  # type: ignore[misc]
                BOUND,
            )
            until("the agent ready", lambda: ready_agents(server, POOL) == AGENTS, BOUND)
            until(
                "the old incarnation's slots removed",
                lambda o=old: not o & server.containers(),  # type: ignore[misc]
                BOUND,
            )
            until("the warm slots made again", lambda: warm_ready(server, POOL) == full, BOUND)
            inv, found = settled_leaks(server, (POOL,))
            assert not old & set(inv.warm), "an old slot is still counted as warm"
            totals["slots_replaced"] += len(old)
            report(
                f"warm slots, agent kill -9 round {r + 1}/{ROUNDS}", inv, found,
                victim_slots_removed=len(old),
            )  # fmt: skip
        report("warm slots total", *settled_leaks(server, (POOL,)), rounds=ROUNDS, **totals)
    finally:
        drop_pool(server, POOL)


def _restarted(server: Server, agent: str, old_pid: int) -> bool:
    try:
        return agent_pid(server, agent) != old_pid
    except (OSError, ValueError, KeyError):
        return False
