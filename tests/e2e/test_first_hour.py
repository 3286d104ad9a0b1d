"""A newcomer's first hour against a real, fresh `fsb server` (real agents, containerd + runc,
SQLite): the default pool grows on demand, creates sent the moment the server says `ready` wait
for its first agent instead of failing, and a pool that may still grow makes a create wait, not
fail, while one at its poolMax refuses with the command that raises it.

The tests share one server and run in file order: the first one needs it fresh.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from fastsandbox.sdk import Client
from tests.e2e._server import Server, new_server, purge

pytestmark = pytest.mark.e2e

SLEEP = ["--", "sleep", "300"]
# The first creates go through the real CLI; the rest through the SDK, as the CLI's own start-up
# (a Python interpreter per call) would dominate on a small machine.
CLI_CREATES = 4
TOTAL = 64


@pytest.fixture(scope="module")
def server(registry_addr: str) -> Iterator[Server]:
    srv = new_server(registry_addr)
    try:
        srv.start()  # returns the moment the server prints `ready`
        yield srv
    finally:
        purge(srv)


def client(server: Server) -> Client:
    token = (server.data_dir / "token").read_text().strip()
    return Client(server.endpoint, token, "default", ca_file=server.ca_file)


def test_a_fresh_server_takes_64_sandboxes_in_a_row_from_the_moment_it_is_ready(
    server: Server, demo_image: str
) -> None:
    names = [f"first-{i}" for i in range(TOTAL)]
    made: list[str] = []
    scaled = 0
    waits: list[float] = []
    began = time.perf_counter()
    try:
        with client(server) as fsb:
            for name in names[:CLI_CREATES]:
                result = server.fsb("run", name, "--image", demo_image, "-o", "json", *SLEEP)
                assert result.returncode == 0, f"{name}: {result.stderr}"
                made.append(name)
                timings = json.loads(result.stdout)["status"]["timings"]
                waits.append(timings.get("scaledMs") or 0.0)
            for name in names[CLI_CREATES:]:
                created = fsb.create(name, demo_image, command=["sleep", "300"])
                made.append(name)
                assert created.phase == "Running", created
                scaled += created.timings.scaled_ms is not None
                waits.append(created.timings.scaled_ms or 0.0)
            running = {s.metadata.name: s for s in fsb.list() if s.status.phase.value == "Running"}
            assert set(running) >= set(names)
        # More agents than the one the pool starts with, and creates said they waited for them.
        agents = {running[name].status.assigned_agent for name in names}
        assert len(agents) >= 2, agents
        assert scaled >= 1
        # Numbers for the report, not a pass/fail.
        print(
            f"\n{TOTAL} creates from `ready`: {time.perf_counter() - began:.1f} s in all, "
            f"{len(agents)} agents, {sum(1 for w in waits if w)} creates waited for an agent "
            f"(scaledMs {', '.join(f'{w:.0f}' for w in waits if w)})"
        )
    finally:
        with client(server) as fsb:
            for name in made:
                fsb.delete(name, wait=True)


def test_a_pool_that_may_grow_makes_creates_wait_and_refuses_at_its_pool_max(
    server: Server, demo_image: str
) -> None:
    pool = "grow3"
    made = server.fsb(
        "pool", "create", pool, *server.pool_args, "--min", "1", "--max", "3", "--per-agent", "2"
    )
    assert made.returncode == 0, made.stderr
    names = [f"g-{i}" for i in range(7)]
    try:
        for name in names[:6]:
            result = server.fsb("run", name, "--image", demo_image, "--pool", pool, *SLEEP)
            assert result.returncode == 0, f"{name}: {result.stderr}"
        waited = server.fsb("describe", names[2])
        assert waited.returncode == 0, waited.stderr
        assert "waited for a new agent" in waited.stdout, waited.stdout
        refused = server.fsb("run", names[6], "--image", demo_image, "--pool", pool, *SLEEP)
        assert refused.returncode == 5, refused.stderr
        assert "is full" in refused.stderr
        assert f"fsb pool scale {pool} --min 1 --max 4" in refused.stderr, refused.stderr
        # Raising poolMax as the message says makes room.
        raised = server.fsb("pool", "scale", pool, "--min", "1", "--max", "4")
        assert raised.returncode == 0, raised.stderr
        again = server.fsb("run", names[6], "--image", demo_image, "--pool", pool, *SLEEP)
        assert again.returncode == 0, again.stderr
    finally:
        for name in names:
            server.fsb("delete", name, "--wait")
        server.fsb("pool", "delete", pool)
