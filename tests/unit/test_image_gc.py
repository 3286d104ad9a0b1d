"""The image collector's choices: least recently used first, blobs shared between images counted
once, never an image in use or pinned (a pool's prewarm image), stopping once within budget."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from fastsandbox.errors import InvalidArgument
from fastsandbox.janitor.images import CachedImage, ImageCollector, cache_bytes, choose_evictions

BASE = {"sha256:base": 100}


def image(name: str, pulled_at: float, own: int, *, shared: bool = True) -> CachedImage:
    blobs = {f"sha256:{name}": own, **(BASE if shared else {})}
    return CachedImage(f"docker.io/library/{name}:latest", pulled_at, blobs)


A, B, C = image("a", 1.0, 50), image("b", 2.0, 50), image("c", 3.0, 50)


def test_shared_blobs_count_once() -> None:
    assert cache_bytes([A, B, C]) == 100 + 3 * 50


def test_oldest_first_until_within_budget() -> None:
    assert choose_evictions([A, B, C], budget_bytes=200, keep=(), last_used={}) == [A.name]
    assert choose_evictions([A, B, C], budget_bytes=150, keep=(), last_used={}) == [A.name, B.name]
    assert choose_evictions([A, B, C], budget_bytes=250, keep=(), last_used={}) == []


def test_a_recent_use_counts_as_much_as_a_pull() -> None:
    got = choose_evictions([A, B, C], budget_bytes=200, keep=(), last_used={A.name: 10.0})
    assert got == [B.name]


def test_in_use_and_pinned_are_never_evicted_even_over_budget() -> None:
    got = choose_evictions([A, B, C], budget_bytes=0, keep={A.name, C.name}, last_used={})
    assert got == [B.name]


class FakeCache:
    def __init__(self, images: list[CachedImage], in_use: set[str]) -> None:
        self.images = {i.name: i for i in images}
        self.in_use = in_use
        self.deleted: list[str] = []

    async def cached_images(self) -> list[CachedImage]:
        return list(self.images.values())

    async def images_in_use(self) -> set[str]:
        return set(self.in_use)

    async def delete_image(self, name: str) -> None:
        self.deleted.append(name)
        del self.images[name]


async def test_the_collector_remembers_use_and_normalises_pins() -> None:
    cache = FakeCache([A, B, C], in_use={A.name})
    now = [100.0]

    async def pinned() -> Collection[str]:
        return ["c"]  # as a pool spells it

    collector = ImageCollector(cache, budget_bytes=1, pinned=pinned, wall_clock=lambda: now[0])
    assert await collector.collect() == [B.name]
    # A stops being used; its last use (100) is later than anything else's pull, but it is the
    # only candidate left.
    cache.in_use = set()
    assert await collector.collect() == [A.name]
    assert list(cache.images) == [C.name]


def test_a_zero_budget_is_refused() -> None:
    async def pinned() -> Collection[str]:
        return ()

    with pytest.raises(InvalidArgument, match="positive"):
        ImageCollector(FakeCache([], set()), budget_bytes=0, pinned=pinned)
