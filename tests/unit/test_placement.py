"""Placement rules: image affinity over load, namespace and pool isolation, ports, capacity."""

from __future__ import annotations

import pytest

from fastsandbox.control.placement import (
    UNCACHED_IMAGE_PENALTY,
    Candidate,
    Request,
    choose,
)
from fastsandbox.control.registry import AgentRecord, Registry
from fastsandbox.errors import CapacityExhausted

IMG = "127.0.0.1:5000/busybox:latest"


def agent(
    name: str, *, allocated: int = 0, images: set[str] | None = None, **kw: object
) -> Candidate:
    fields: dict[str, object] = {
        "name": name,
        "namespace": "default",
        "pool": "p",
        "capacity": 10,
        "allocated": allocated,
        "ports_in_use": frozenset(),
        "images": frozenset(images or ()),
    }
    fields.update(kw)
    return Candidate(**fields)  # type: ignore[arg-type]


def req(image: str = IMG, ports: set[int] | None = None, namespace: str = "default") -> Request:
    return Request(namespace=namespace, pool="p", image=image, ports=frozenset(ports or ()))


def test_image_affinity_beats_load() -> None:
    cached_busy = agent("a", allocated=5, images={IMG})
    idle_cold = agent("b", allocated=0)
    assert choose([idle_cold, cached_busy], req()) == cached_busy


def test_least_loaded_wins_when_image_is_everywhere_or_nowhere() -> None:
    assert choose([agent("a", allocated=3), agent("b", allocated=1)], req()).name == "b"  # type: ignore[union-attr]
    both = [agent("a", allocated=3, images={IMG}), agent("b", allocated=1, images={IMG})]
    assert choose(both, req()).name == "b"  # type: ignore[union-attr]


def test_affinity_penalty_is_bounded() -> None:
    # A cached agent so loaded that the penalty is outweighed loses to an idle one.
    cached = agent("a", allocated=UNCACHED_IMAGE_PENALTY + 1, capacity=10**6, images={IMG})
    assert choose([cached, agent("b")], req()).name == "b"  # type: ignore[union-attr]


def test_namespace_and_pool_never_mix() -> None:
    other_ns = agent("a", namespace="ns-b")
    other_pool = agent("b", pool="q")
    assert choose([other_ns, other_pool], req()) is None
    assert choose([other_ns], req(namespace="ns-b")) == other_ns


def test_ports_are_exclusive_per_agent() -> None:
    busy = agent("a", ports_in_use=frozenset({8080}))
    free = agent("b", allocated=4)
    assert choose([busy, free], req(ports={8080})) == free
    assert choose([busy], req(ports={8080, 9090})) is None
    assert choose([busy], req(ports={9090})) == busy


def test_full_unready_and_draining_agents_are_skipped() -> None:
    assert choose([agent("a", allocated=10)], req()) is None
    assert choose([agent("a", ready=False)], req()) is None
    assert choose([agent("a", draining=True)], req()) is None


def _registry(*agents: tuple[str, int]) -> Registry:
    registry = Registry()
    for name, capacity in agents:
        record = registry.upsert_agent(
            AgentRecord(name, "default", "p", f"unix:///{name}", "10.0.0.1", capacity)
        )
        registry.heartbeat(record.name, images=[])
    return registry


def test_registry_allocates_until_full_then_frees_on_release() -> None:
    registry = _registry(("a", 2))
    first = registry.allocate(namespace="default", pool="p", image=IMG, ports=[], sandbox_id="s1")
    registry.allocate(namespace="default", pool="p", image=IMG, ports=[], sandbox_id="s2")
    with pytest.raises(CapacityExhausted, match="full"):
        registry.allocate(namespace="default", pool="p", image=IMG, ports=[], sandbox_id="s3")
    registry.release(first.agent, "s1")
    assert registry.allocate(namespace="default", pool="p", image=IMG, ports=[], sandbox_id="s3")
    assert registry.pool_slots("default", "p") == (2, 2)


def test_registry_spreads_same_port_over_agents() -> None:
    registry = _registry(("a", 5), ("b", 5))
    one = registry.allocate(namespace="default", pool="p", image=IMG, ports=[8080], sandbox_id="1")
    two = registry.allocate(namespace="default", pool="p", image=IMG, ports=[8080], sandbox_id="2")
    assert one.agent != two.agent
    assert one.endpoints == ["10.0.0.1:8080"]
    with pytest.raises(CapacityExhausted, match="port"):
        registry.allocate(namespace="default", pool="p", image=IMG, ports=[8080], sandbox_id="3")


def test_registry_unknown_pool_says_what_to_do() -> None:
    with pytest.raises(CapacityExhausted, match="no agents"):
        Registry().allocate(namespace="default", pool="p", image=IMG, ports=[], sandbox_id="x")


def test_affinity_matches_the_normalised_image_name() -> None:
    # Agents report images as containerd stores them; users write short names.
    cached = agent("a", allocated=3, images={"docker.io/library/busybox:latest"})
    assert choose([agent("b"), cached], req(image="busybox")) == cached
