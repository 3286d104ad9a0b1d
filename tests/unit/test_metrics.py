"""The metrics/health endpoint over real HTTP on loopback: Prometheus text with our names,
scrape-time gauges, readiness flipping from 503 (with the reason) to 200."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastsandbox.metrics import HealthState, Metrics, MetricsServer


@pytest.fixture
async def served() -> AsyncIterator[MetricsServer]:
    server = MetricsServer(Metrics("server"), HealthState(), "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def get(server: MetricsServer, raw: bytes) -> tuple[int, str]:
    host, port = server.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def request(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def test_metrics_text_has_our_families(served: MetricsServer) -> None:
    m = served.metrics
    m.create_seconds.labels(mode="fast", warm="false").observe(0.042)
    m.creates_total.labels(mode="fast", outcome="ok").inc()
    m.gauge("fsb_slots", "Slots by state.", ("state",), lambda: {("total",): 8, ("allocated",): 3})
    status, body = await get(served, request("/metrics"))
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert {"fsb_create_seconds", "fsb_creates", "fsb_exec_seconds", "fsb_image_pull_seconds",
            "fsb_warm_slot_claims", "fsb_slots"} <= set(families)  # fmt: skip
    slots = {s.labels["state"]: s.value for s in families["fsb_slots"].samples}
    assert slots == {"total": 8, "allocated": 3}
    count = [s for s in families["fsb_create_seconds"].samples if s.name.endswith("_count")]
    assert count[0].value == 1 and count[0].labels == {"mode": "fast", "warm": "false"}


async def test_gauges_are_read_at_scrape_time(served: MetricsServer) -> None:
    state = {"n": 1.0}
    served.metrics.gauge("fsb_agents", "Agents.", ("state",), lambda: {("ready",): state["n"]})
    _, first = await get(served, request("/metrics"))
    state["n"] = 5.0
    _, second = await get(served, request("/metrics"))
    assert 'fsb_agents{state="ready"} 1.0' in first
    assert 'fsb_agents{state="ready"} 5.0' in second


async def test_readiness_says_why_until_ready(served: MetricsServer) -> None:
    served.health.not_ready("recovering: 3 agents to ask")
    assert await get(served, request("/readyz")) == (
        503,
        "not ready: recovering: 3 agents to ask\n",
    )
    assert (await get(served, request("/healthz")))[0] == 200
    served.health.ready()
    assert await get(served, request("/readyz")) == (200, "ready\n")


async def test_unknown_paths_methods_and_garbage(served: MetricsServer) -> None:
    assert (await get(served, request("/nope")))[0] == 404
    assert (await get(served, request("/metrics", "POST")))[0] == 405
    assert (await get(served, b"\x00\x01garbage\r\n\r\n"))[0] == 400
    status, body = await get(served, request("/healthz", "HEAD"))
    assert (status, body) == (200, "")


def test_every_metric_name_carries_its_unit_or_total() -> None:
    m = Metrics("agent")
    for family in m.registry.collect():
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples) or not family.samples
