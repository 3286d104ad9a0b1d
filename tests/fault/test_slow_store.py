"""A slow and a stalled store (issue 12), against a real `fsb server` whose SQLite store waits
before each write (`store/faults.py`, the only fault injected: the store is the real one):

- slow (a wait before every write): Fast creates in two pools are answered, each one is
  stored soon after; a Strong create (record first) succeeds, only later;
- stalled (every write held until let go): a Fast create is still answered — first, while
  its record cannot have been written (not in the SQLite file yet) — and exec reaches it; a
  create in the other pool is placed and answered too (no stalled placement elsewhere); a
  Strong create ends with a clear error at its deadline instead of hanging;
- let go: every answered create is stored and Running, the Strong one that timed out is
  either gone or Running (never left half-made), nothing leaks.

Causality, not timing: while the store is held nothing can be written, so an answer that
arrives then was given before its write. Durations are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time

import pytest

from fastsandbox.errors import FsbError, NotFound
from fastsandbox.sdk import AsyncClient
from fastsandbox.sdk.commands import AsyncCommands
from tests.e2e._server import Server
from tests.fault.conftest import (
    drop_pool,
    make_pool,
    report,
    sdk_client,
    set_store_delay,
    settled_leaks,
    until,
)

pytestmark = pytest.mark.e2e

POOLS = ("slow-a", "slow-b")
SLOW = "0.5"
STRONG_DEADLINE = 5.0
BOUND = 90.0


def _stored(server: Server) -> set[str]:
    """Sandbox names in the SQLite file itself (not the server's memory)."""
    with sqlite3.connect(f"file:{server.data_dir / 'state.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT name FROM objects WHERE kind = 'Sandbox'").fetchall()
    return {str(r[0]) for r in rows}


async def _timed_create(client: AsyncClient, name: str, image: str, pool: str, **kw: str) -> float:
    started = time.monotonic()
    await client.create(name, image, pool=pool, command=["sleep", "3600"], **kw)  # type: ignore[arg-type]
    return time.monotonic() - started


async def _scenario(server: Server, image: str, figures: dict[str, object]) -> list[str]:
    made: list[str] = []
    async with sdk_client(server) as client:
        # Baseline, measured in the same run: the same creates with no delay.
        base = [f"base-{p[-1]}-{i}" for p in POOLS for i in range(2)]
        took_base = await asyncio.wait_for(
            asyncio.gather(
                *(_timed_create(client, n, image, f"slow-{n.split('-')[1]}") for n in base)
            ),
            BOUND,
        )
        made += base
        figures["baseline_fast_create_s"] = ",".join(f"{t:.2f}" for t in took_base)
        # Slow: every write waits; Fast creates in both pools answered, Strong succeeds.
        set_store_delay(server, SLOW)
        names = [f"slow-{p[-1]}-{i}" for p in POOLS for i in range(2)]
        took = await asyncio.wait_for(
            asyncio.gather(
                *(_timed_create(client, n, image, f"slow-{n.split('-')[1]}") for n in names)
            ),
            BOUND,
        )
        made += names
        strong_s = await asyncio.wait_for(
            _timed_create(client, "slow-strong", image, POOLS[0], mode="strong"), BOUND
        )
        made.append("slow-strong")
        assert (await client.get("slow-strong")).status.phase.value == "Running"
        figures["slow_fast_create_s"] = ",".join(f"{t:.2f}" for t in took)
        figures["slow_strong_create_s"] = f"{strong_s:.2f}"
        until("the slow creates stored", lambda: set(made) <= _stored(server), BOUND)

        # Stalled: nothing can be written until it is let go.
        set_store_delay(server, "hold")
        try:
            held_a = await asyncio.wait_for(_timed_create(client, "held-a", image, POOLS[0]), BOUND)
            held_b = await asyncio.wait_for(_timed_create(client, "held-b", image, POOLS[1]), BOUND)
            made += ["held-a", "held-b"]
            not_yet = {"held-a", "held-b"} & _stored(server)
            assert not not_yet, f"stored while the store was held: {not_yet}"
            got = await asyncio.wait_for(
                AsyncCommands(client, "default", "held-a").run(["echo", "ok"], timeout=30), BOUND
            )
            assert got.stdout == "ok\n"
            async with sdk_client(server, timeout=STRONG_DEADLINE) as short:
                started = time.monotonic()
                try:
                    await asyncio.wait_for(
                        _timed_create(short, "held-strong", image, POOLS[0], mode="strong"),
                        STRONG_DEADLINE + BOUND,
                    )
                    strong_error = "none: it succeeded"
                except FsbError as exc:
                    strong_error = f"{type(exc).__name__}: {exc}"
                    assert str(exc).strip(), "a Strong create failed without a message"
                strong_waited = time.monotonic() - started
            figures["held_fast_create_s"] = f"{held_a:.2f},{held_b:.2f}"
            figures["held_strong"] = repr(strong_error[:120])
            figures["held_strong_s"] = f"{strong_waited:.2f}"
        finally:
            set_store_delay(server, None)

        until("the held creates stored", lambda: {"held-a", "held-b"} <= _stored(server), BOUND)
        for name in made:
            assert (await client.get(name)).status.phase.value == "Running", name

        async def settled_strong() -> bool:
            try:
                phase = (await client.get("held-strong")).status.phase.value
            except NotFound:
                return True
            return phase == "Running"

        deadline = time.monotonic() + BOUND
        while not await settled_strong():
            assert time.monotonic() < deadline, "the timed-out Strong create was left half-made"
            await asyncio.sleep(0.5)
        with_strong = [*made, "held-strong"]
        figures["held_strong_outcome"] = "Running" if "held-strong" in _stored(server) else "absent"
        return with_strong


async def _delete(server: Server, names: list[str]) -> None:
    async with sdk_client(server) as client:
        for name in names:
            with contextlib.suppress(NotFound):
                await client.delete(name, wait=True)


def test_a_slow_and_a_stalled_store(server: Server, demo_image: str) -> None:
    for pool in POOLS:
        make_pool(server, pool, agents=1, per_agent=8)
    figures: dict[str, object] = {}
    try:
        made = asyncio.run(_scenario(server, demo_image, figures))
        inv, found = settled_leaks(server, POOLS)
        report("slow/stalled store", inv, found, sandboxes=len(made), **figures)
        asyncio.run(_delete(server, made))
    finally:
        set_store_delay(server, None)
        for pool in POOLS:
            drop_pool(server, pool)
