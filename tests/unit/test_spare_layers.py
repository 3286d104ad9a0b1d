"""Spare layer images (agent/runtime/spare_layers.py) with a stand-in format (a file written):
a take moves a spare to the container's name, the refill waits while a create is in flight,
and close or a restart leaves no spare behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from fastsandbox.agent.runtime.spare_layers import SpareLayers

SIZE = 1 << 20


class Formats:
    def __init__(self) -> None:
        self.made: list[Path] = []

    async def __call__(self, path: Path, size: int) -> None:
        path.write_bytes(b"x" * 8)
        self.made.append(path)


async def _until(check: Callable[[], bool], bound: float = 5.0) -> None:
    async with asyncio.timeout(bound):
        while not check():
            await asyncio.sleep(0.001)


async def test_a_take_renames_a_spare_and_the_refill_makes_the_next(tmp_path: Path) -> None:
    formats = Formats()
    spares = SpareLayers(tmp_path, formats, per_size=1, quiet=0.0)
    try:
        assert not spares.take(SIZE, tmp_path / "a.img")  # none yet: the caller formats
        await _until(lambda: spares.count(SIZE) == 1)
        spare = formats.made[0]
        assert spares.take(SIZE, tmp_path / "b.img")
        assert (tmp_path / "b.img").exists() and not spare.exists()
        assert not spares.take(2 * SIZE, tmp_path / "c.img")  # another size: none ready
        await _until(lambda: spares.count(SIZE) == 1 and spares.count(2 * SIZE) == 1)
    finally:
        await spares.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.img"]


async def test_no_refill_while_a_create_is_in_flight(tmp_path: Path) -> None:
    formats = Formats()
    spares = SpareLayers(tmp_path, formats, per_size=1, quiet=0.0)
    try:
        with spares.busy():
            assert not spares.take(SIZE, tmp_path / "a.img")
            for _ in range(20):
                await asyncio.sleep(0)
            assert formats.made == []
        await _until(lambda: spares.count(SIZE) == 1)
    finally:
        await spares.close()


async def test_a_spare_gone_under_it_is_skipped_and_a_restart_sweeps_leftovers(
    tmp_path: Path,
) -> None:
    formats = Formats()
    spares = SpareLayers(tmp_path, formats, per_size=1, quiet=0.0)
    try:
        spares.take(SIZE, tmp_path / "a.img")
        await _until(lambda: spares.count(SIZE) == 1)
        formats.made[0].unlink()  # the janitor swept it
        assert not spares.take(SIZE, tmp_path / "b.img")
    finally:
        await spares.close()
    # A previous run's leftovers (a spare, a format's template dir) go at the first use.
    (tmp_path / ".spare-1-0.img").write_bytes(b"x")
    (tmp_path / ".spare-1-1.tmpl" / "upper").mkdir(parents=True)
    again = SpareLayers(tmp_path, Formats(), per_size=0)
    assert not again.take(SIZE, tmp_path / "c.img")
    fresh = SpareLayers(tmp_path, Formats(), per_size=1, quiet=3600)
    try:
        fresh.take(SIZE, tmp_path / "c.img")
        assert not list(tmp_path.glob(".spare-*"))
    finally:
        await fresh.close()


async def test_disabled_spares_make_nothing(tmp_path: Path) -> None:
    formats = Formats()
    spares = SpareLayers(tmp_path, formats, per_size=0)
    assert not spares.take(SIZE, tmp_path / "a.img")
    await asyncio.sleep(0.01)
    assert formats.made == []
    await spares.close()
