"""`fsb server --metrics-listen` against a real server: /readyz says ready once the server does,
/healthz answers, and /metrics counts a create (by mode and outcome), its latency, an exec's
latency and the agents' slots — each scraped over HTTP and parsed as Prometheus text."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e._server import Server, free_port, new_server, purge

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def served(registry_addr: str) -> Iterator[tuple[Server, str]]:
    address = f"127.0.0.1:{free_port()}"
    srv = new_server(registry_addr, "--metrics-listen", address)
    try:
        srv.start()
        yield srv, address
    finally:
        purge(srv)


def get(address: str, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=30) as reply:
        return reply.status, reply.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_health_and_metrics_of_a_real_server(served: tuple[Server, str], demo_image: str) -> None:
    server, address = served
    assert get(address, "/readyz") == (200, "ready\n")
    assert get(address, "/healthz")[0] == 200
    name = "metered"
    made = server.fsb("run", name, "--image", demo_image)
    assert made.returncode == 0, made.stderr
    try:
        ran = server.fsb("exec", name, "--", "true")
        assert ran.returncode == 0, ran.stderr
        refused = server.fsb("run", "bad", "--image", demo_image, "--pool", "no-such-pool")
        assert refused.returncode == 3, refused.stderr
        status, text = get(address, "/metrics")
        assert status == 200
        got = samples(text)
        print({k: v for k, v in got.items() if k[0].startswith("fsb_")})
        assert got[("fsb_creates_total", (("mode", "fast"), ("outcome", "ok")))] >= 1
        assert got[("fsb_creates_total", (("mode", "fast"), ("outcome", "NotFound")))] >= 1
        assert got[("fsb_create_seconds_count", (("mode", "fast"), ("warm", "false")))] >= 1
        assert got[("fsb_exec_seconds_count", ())] >= 1
        assert got[("fsb_slots", (("state", "capacity"),))] >= 1
        assert got[("fsb_slots", (("state", "used"),))] >= 1
        assert got[("fsb_agents", (("state", "ready"),))] >= 1
    finally:
        server.fsb("delete", name, "--wait")
