"""An index of a pool's agents by placement score, so a placement looks at a handful of agents.

`placement.choose` is the rule (and the reference the tests compare against); this keeps, per
(namespace, pool), the agents that can take a sandbox at all (ready, not draining or cordoned,
a free slot) sorted by (allocated, name), once over all of them and once per image each caches.
A placement then reads the least-loaded agent that caches the image and the least-loaded agent
overall, walking past only the agents that the request's own filters (excluded names, ports
already taken) rule out. The registry re-files an agent whenever anything its score or
eligibility depends on changes (see `AgentRecord.__setattr__` and the registry's slot methods).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fastsandbox.control.placement import UNCACHED_IMAGE_PENALTY

Key = tuple[int, str]  # (allocated, agent name): the order placement prefers

# Blocks of the sorted list hold about this many keys: an insert or removal moves at most
# twice that many pointers, whatever the pool's size (a flat list would move half the pool).
_BLOCK = 256


class SortedKeys:
    """A sorted set of keys as a list of sorted blocks (ordered, no duplicates)."""

    __slots__ = ("_blocks", "_len", "_maxes")

    def __init__(self) -> None:
        self._blocks: list[list[Key]] = []
        # The last key of each block, to find a key's block by bisection.
        self._maxes: list[Key] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, key: Key) -> None:
        if not self._blocks:
            self._blocks.append([key])
            self._maxes.append(key)
            self._len = 1
            return
        i = bisect_left(self._maxes, key)
        if i == len(self._blocks):
            i -= 1
        block = self._blocks[i]
        insort(block, key)
        self._maxes[i] = block[-1]
        self._len += 1
        if len(block) > 2 * _BLOCK:
            self._blocks[i : i + 1] = [block[:_BLOCK], block[_BLOCK:]]
            self._maxes[i : i + 1] = [block[_BLOCK - 1], block[-1]]

    def discard(self, key: Key) -> None:
        i = bisect_left(self._maxes, key)
        if i == len(self._blocks):
            return
        block = self._blocks[i]
        j = bisect_left(block, key)
        if j == len(block) or block[j] != key:
            return
        del block[j]
        self._len -= 1
        if block:
            self._maxes[i] = block[-1]
        else:
            del self._blocks[i]
            del self._maxes[i]

    def __iter__(self) -> Iterator[Key]:
        for block in self._blocks:
            yield from block


@dataclass(slots=True)
class PoolIndex:
    """The eligible agents of one (namespace, pool)."""

    all: SortedKeys = field(default_factory=SortedKeys)
    by_image: dict[str, SortedKeys] = field(default_factory=dict)

    def add(self, key: Key, images: frozenset[str]) -> None:
        self.all.add(key)
        for image in images:
            keys = self.by_image.get(image)
            if keys is None:
                keys = self.by_image[image] = SortedKeys()
            keys.add(key)

    def discard(self, key: Key, images: frozenset[str]) -> None:
        self.all.discard(key)
        for image in images:
            keys = self.by_image.get(image)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_image[image]

    def best(
        self,
        image: str,
        normalized: str,
        usable: Callable[[str], bool],
    ) -> str | None:
        """The agent `placement.choose` would pick for `image` (also cached as `normalized`);
        `usable(name)`: the request's own filters (excluded names, ports taken) let it."""
        best: tuple[int, str] | None = None
        for ref in {image, normalized}:
            keys = self.by_image.get(ref)
            if keys is None:
                continue
            for key in keys:
                if usable(key[1]):
                    if best is None or key < best:
                        best = key
                    break
        # An agent without the image scores its load plus the penalty; once that cannot beat
        # the best cached agent, none further on in load order can either. A cached agent met
        # here is either unusable or scored above already (its score beats the penalised one).
        for allocated, name in self.all:
            score = (allocated + UNCACHED_IMAGE_PENALTY, name)
            if best is not None and score >= best:
                break
            if not usable(name):
                continue
            best = score
            break
        return None if best is None else best[1]
