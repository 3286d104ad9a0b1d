"""The registry's placement index picks exactly what the linear rule (`placement.choose` over
every agent of the pool) picks, whatever sequence of changes came before."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fastsandbox.control.placement import UNCACHED_IMAGE_PENALTY
from fastsandbox.control.placement_index import SortedKeys
from fastsandbox.control.registry import AgentRecord, Registry
from fastsandbox.errors import CapacityExhausted

AGENTS = [f"a{i}" for i in range(6)]
POOLS = ["p", "q"]
# Two spellings of one image (affinity matches the normalised name) and another image.
IMAGES = ["busybox", "docker.io/library/busybox:latest", "alpine:3"]
PORTS = [80, 8080]

_name = st.sampled_from(AGENTS)
_images = st.frozensets(st.sampled_from(IMAGES), max_size=2)
_ports = st.frozensets(st.sampled_from(PORTS), max_size=2)
_request = st.tuples(
    st.sampled_from(POOLS),
    st.sampled_from(IMAGES),
    _ports,
    st.frozensets(_name, max_size=3),
    st.booleans(),
)

_op = st.one_of(
    st.tuples(st.just("upsert"), _name, st.sampled_from(POOLS), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("remove"), _name),
    st.tuples(st.just("heartbeat"), _name, _images),
    st.tuples(st.just("unready"), _name),
    st.tuples(st.just("set"), _name, st.sampled_from(["draining", "cordoned"]), st.booleans()),
    st.tuples(st.just("capacity"), _name, st.integers(0, 4)),
    st.tuples(st.just("allocate"), _request),
    st.tuples(st.just("adopt"), _name, _ports),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("give_up"), st.integers(0, 50)),
)


def _apply(registry: Registry, op: tuple[object, ...], held: list[tuple[str, str]]) -> None:
    kind = op[0]
    counter = len(held)
    if kind == "upsert":
        _, name, pool, capacity, ready = op
        registry.upsert_agent(
            AgentRecord(
                name=str(name),
                namespace="default",
                pool=str(pool),
                target="unix:/x",
                ip="10.0.0.1",
                capacity=int(capacity),  # type: ignore[call-overload]
                ready=bool(ready),
            )
        )
    elif kind == "remove":
        registry.remove_agent(str(op[1]))
    elif kind == "heartbeat":
        registry.heartbeat(str(op[1]), images=op[2])  # type: ignore[arg-type]
    elif kind == "unready":
        registry.mark_unready(str(op[1]))
    elif kind == "set":
        record = registry.get_agent(str(op[1]))
        if record is not None:
            setattr(record, str(op[2]), bool(op[3]))
    elif kind == "capacity":
        record = registry.get_agent(str(op[1]))
        if record is not None:
            record.capacity = int(op[2])  # type: ignore[call-overload]
    elif kind == "allocate":
        pool, image, ports, exclude, exclusive = op[1]  # type: ignore[misc]
        try:
            got = registry.allocate(
                namespace="default",
                pool=pool,
                image=image,
                ports=ports,
                sandbox_id=f"s{counter}",
                exclude=exclude,
                exclusive_ports=exclusive,
            )
        except CapacityExhausted:
            return
        held.append((got.agent, got.sandbox_id))
    elif kind == "adopt":
        if registry.get_agent(str(op[1])) is not None:
            registry.adopt(str(op[1]), f"s{counter}", op[2])  # type: ignore[arg-type]
            held.append((str(op[1]), f"s{counter}"))
    elif kind in ("release", "give_up") and held:
        agent, sid = held.pop(int(op[1]) % len(held))  # type: ignore[call-overload]
        (registry.release if kind == "release" else registry.give_up)(agent, sid)


_start = st.lists(
    st.tuples(st.sampled_from(POOLS), st.integers(0, 4), st.booleans(), _images),
    min_size=len(AGENTS),
    max_size=len(AGENTS),
)


@settings(max_examples=400, deadline=None)
@given(
    start=_start,
    ops=st.lists(_op, min_size=1, max_size=80),
    probes=st.lists(_request, min_size=1, max_size=8),
)
def test_index_matches_the_linear_rule_after_any_sequence(
    start: list[tuple[str, int, bool, frozenset[str]]],
    ops: list[tuple[object, ...]],
    probes: list[tuple[str, str, frozenset[int], frozenset[str], bool]],
) -> None:
    registry = Registry()
    held: list[tuple[str, str]] = []
    for name, (pool, capacity, ready, images) in zip(AGENTS, start, strict=True):
        _apply(registry, ("upsert", name, pool, capacity, ready), held)
        if images:
            registry.heartbeat(name, images=images)
    for op in ops:
        _apply(registry, op, held)
        for pool, image, ports, exclude, exclusive in probes:
            args = dict(
                namespace="default",
                pool=pool,
                image=image,
                ports=ports,
                exclude=exclude,
                exclusive_ports=exclusive,
            )
            assert registry.place(**args) == registry.place_linear(**args), op  # type: ignore[arg-type]


def test_a_record_changed_in_place_is_refiled() -> None:
    registry = Registry()
    for name in ("a", "b"):
        registry.upsert_agent(
            AgentRecord(
                name=name,
                namespace="default",
                pool="p",
                target="unix:/x",
                ip="10.0.0.1",
                capacity=2,
                ready=True,
            )
        )
    place = dict(namespace="default", pool="p", image="busybox", ports=frozenset[int]())
    assert registry.place(**place) == "a"  # type: ignore[arg-type]
    registry.agent("a").draining = True
    assert registry.place(**place) == "b"  # type: ignore[arg-type]
    registry.agent("b").capacity = 0
    assert registry.place(**place) is None  # type: ignore[arg-type]
    registry.agent("a").draining = False
    registry.heartbeat("b", images=["busybox"])
    registry.agent("b").capacity = 2
    assert registry.place(**place) == "b"  # type: ignore[arg-type]


def test_a_cached_agent_loses_only_past_the_penalty() -> None:
    registry = Registry()
    for name, images in (("cold", frozenset[str]()), ("warm", frozenset({"busybox"}))):
        registry.upsert_agent(
            AgentRecord(
                name=name,
                namespace="default",
                pool="p",
                target="unix:/x",
                ip="10.0.0.1",
                capacity=10**6,
                ready=True,
                images=images,
            )
        )
    for i in range(UNCACHED_IMAGE_PENALTY):
        registry.adopt("warm", f"s{i}", [])
    args = dict(namespace="default", pool="p", image="busybox", ports=frozenset[int]())
    # Equal scores (1000, "cold") < (1000, "warm"): the name breaks the tie.
    assert registry.place(**args) == registry.place_linear(**args) == "cold"  # type: ignore[arg-type]
    registry.release("warm", "s0")
    assert registry.place(**args) == registry.place_linear(**args) == "warm"  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.text("ab", max_size=3))))
def test_sorted_keys_keeps_a_sorted_set(ops: list[tuple[bool, int, str]]) -> None:
    keys = SortedKeys()
    model: set[tuple[int, str]] = set()
    for add, n, name in ops * 20:  # enough keys to split blocks
        key = (n, name + str(len(model) % 7))
        if add:
            keys.add(key) if key not in model else None
            model.add(key)
        else:
            keys.discard(key)
            model.discard(key)
        assert len(keys) == len(model)
    assert list(keys) == sorted(model)


def test_sorted_keys_across_many_blocks() -> None:
    keys = SortedKeys()
    model = sorted((i * 7919 % 3001, f"n{i}") for i in range(3000))
    for key in reversed(model):
        keys.add(key)
    for key in model[::3]:
        keys.discard(key)
    keys.discard((-1, "absent"))
    assert list(keys) == [k for i, k in enumerate(model) if i % 3]
