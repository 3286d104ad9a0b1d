"""Pools that scale with demand and drain back, and `fsb apply`, against a real `fsb server`
(real agents in their own network namespaces, containerd + runc, SQLite)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastsandbox.api.images import normalize_image_ref
from tests.e2e._server import Server, new_server, purge

pytestmark = pytest.mark.e2e

SLEEP = ["--", "sleep", "3600"]


@pytest.fixture(scope="module")
def server(registry_addr: str) -> Iterator[Server]:
    srv = new_server(registry_addr)
    try:
        srv.start()
        yield srv
    finally:
        purge(srv)


def run_until_placed(server: Server, name: str, pool: str, image: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    """`fsb run` retried while the pool answers RESOURCE_EXHAUSTED (it scales up meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        result = server.fsb("run", name, "--image", image, "--pool", pool, "-o", "json", *SLEEP)
        if result.returncode == 0:
            return result
        assert result.returncode == 5, result.stderr  # capacity exhausted, nothing else
        assert time.monotonic() < deadline, f"{name} not placed in {timeout}s: {result.stderr}"
        time.sleep(0.5)


def wait_pool(server: Server, pool: str, check, timeout: float = 30.0) -> dict:  # type: ignore[no-untyped-def, type-arg]
    deadline = time.monotonic() + timeout
    while True:
        data = server.fsb_json("pool", "get", pool)
        if check(data.get("status", {})):
            return data
        assert time.monotonic() < deadline, f"pool {pool} status: {data.get('status')}"
        time.sleep(0.3)


def test_pool_scales_up_on_demand_and_drains_back(server: Server, demo_image: str) -> None:
    pool = "scaler"
    made = server.fsb(
        "pool", "create", pool, *server.pool_args, "--min", "1", "--max", "3", "--per-agent", "1"
    )
    assert made.returncode == 0, made.stderr
    names = ["sc-a", "sc-b", "sc-c"]
    try:
        wait_pool(server, pool, lambda st: st.get("agents", {}).get("ready") == 1)
        agents = set()
        for name in names:
            run_until_placed(server, name, pool, demo_image)
            agents.add(server.fsb_json("get", name)["status"]["assignedAgent"])
        assert len(agents) == 3
        status = wait_pool(server, pool, lambda st: st["slots"].get("allocated") == 3)["status"]
        assert status["agents"]["total"] == 3

        for name in names[:2]:
            deleted = server.fsb("delete", name, "--wait")
            assert deleted.returncode == 0, deleted.stderr
        status = wait_pool(
            server,
            pool,
            lambda st: st["agents"].get("total") == 1 and st["slots"].get("total") == 1,
        )["status"]
        assert status["slots"]["allocated"] == 1
        kept = server.fsb_json("get", names[2])
        assert kept["status"]["phase"] == "Running"
        assert server.fsb_json("pool", "get", pool)["status"]["agents"].get("draining", 0) == 0
    finally:
        for name in names:
            server.fsb("delete", name, "--wait")
        server.fsb("pool", "delete", pool)


def test_a_warm_pool_shows_its_slots_and_creates_claim_them(
    server: Server, demo_image: str
) -> None:
    """`fsb pool create --warm-slots 1 --prewarm-image IMG`: the pool's status shows the slot,
    a create claims it (timings.warm) and the sandbox is like any other (exec, hostname)."""
    pool, name = "warmed", "wm-a"
    made = server.fsb(
        "pool", "create", pool, "--min", "1", "--max", "1", "--per-agent", "3",
        "--warm-slots", "1", "--prewarm-image", demo_image,
        # Slots do not hold a private namespace of their own yet: private pools keep none.
        "--network-mode", "shared",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    image = normalize_image_ref(demo_image)

    def slot_ready(st: dict) -> bool:  # type: ignore[type-arg]
        return any(w["image"] == image and w.get("ready", 0) >= 1 for w in st.get("warmSlots", []))

    try:
        spec = server.fsb_json("pool", "get", pool)["spec"]
        assert (spec["warmSlots"], spec["prewarmImages"]) == (1, [demo_image])
        wait_pool(server, pool, slot_ready)
        ran = server.fsb("run", name, "--image", demo_image, "--pool", pool, "-o", "json", *SLEEP)
        assert ran.returncode == 0, ran.stderr
        status = server.fsb_json("get", name)["status"]
        assert status["timings"]["warm"] is True, status
        hostname = server.fsb("exec", name, "--", "hostname")
        assert hostname.stdout.strip() == status["containerID"], hostname.stderr
        wait_pool(server, pool, slot_ready)  # refilled
    finally:
        server.fsb("delete", name, "--wait")
        server.fsb("pool", "delete", pool)


def test_pool_scale_verb_changes_bounds(server: Server) -> None:
    pool = "scaleverb"
    assert (
        server.fsb("pool", "create", pool, *server.pool_args, "--min", "1", "--max", "1").returncode
        == 0
    )
    try:
        scaled = server.fsb("pool", "scale", pool, "--min", "2")
        assert scaled.returncode == 0, scaled.stderr
        assert "min 2, max 2" in scaled.stdout
        wait_pool(server, pool, lambda st: st.get("agents", {}).get("ready") == 2)
        bad = server.fsb("pool", "scale", pool, "--min", "3", "--max", "2")
        assert bad.returncode != 0
        assert "poolMax" in bad.stderr
        assert server.fsb("pool", "scale", pool, "--min", "1").returncode == 0
        wait_pool(server, pool, lambda st: st.get("agents", {}).get("total") == 1)
    finally:
        server.fsb("pool", "delete", pool)


def test_apply_pool_and_sandbox_converges(server: Server, demo_image: str, tmp_path: Path) -> None:
    manifest = tmp_path / "app.yaml"
    manifest.write_text(
        f"""\
apiVersion: fastsandbox.io/v1alpha1
kind: Sandbox
metadata:
  name: applied
  labels: {{app: demo}}
spec:
  image: {demo_image}
  poolRef: applypool
  command: [sleep, "3600"]
---
apiVersion: fastsandbox.io/v1alpha1
kind: SandboxPool
metadata:
  name: applypool
spec:
  capacity: {{poolMin: 1, poolMax: 2}}
  maxSandboxesPerAgent: 2
"""
    )
    try:
        first = server.fsb("apply", "-f", str(manifest))
        if first.returncode != 0:
            print((server.data_dir / "server.log").read_text()[-20000:])
        assert first.returncode == 0, first.stderr
        assert "pool default/applypool created" in first.stdout
        assert "sandbox default/applied created" in first.stdout
        assert server.fsb_json("get", "applied")["status"]["phase"] == "Running"

        again = server.fsb("apply", "-f", str(manifest))
        assert again.returncode == 0, again.stderr
        assert "pool default/applypool unchanged" in again.stdout
        assert "sandbox default/applied unchanged" in again.stdout

        changed = manifest.read_text().replace("{app: demo}", "{app: demo2}")
        changed = changed.replace("poolMax: 2", "poolMax: 3")
        manifest.write_text(changed)
        third = server.fsb("apply", "-f", str(manifest))
        assert third.returncode == 0, third.stderr
        assert "pool default/applypool configured" in third.stdout
        assert "sandbox default/applied configured" in third.stdout
        assert server.fsb_json("get", "applied")["metadata"]["labels"] == {"app": "demo2"}
        assert server.fsb_json("pool", "get", "applypool")["spec"]["capacity"]["poolMax"] == 3

        manifest.write_text(changed.replace("PerAgent: 2", "PerAgent: 2\n  runtime: gvisor"))
        immut = server.fsb("apply", "-f", str(manifest))
        assert immut.returncode == 2, immut.stderr
        assert "runtime is immutable" in immut.stderr
    finally:
        server.fsb("delete", "applied", "--wait")
        server.fsb("pool", "delete", "applypool")


def test_version_change_rolls_agents_surge_ready_first(
    server: Server, demo_image: str, tmp_path: Path
) -> None:
    """Two busy agents, then agentVersion v2 (`fsb apply`): a v2 agent is Ready before any old
    agent drains, the old agents keep their sandboxes (draining, never stopped while busy), and
    go once their sandboxes are deleted."""
    pool = "roller"
    made = server.fsb(
        "pool", "create", pool, *server.pool_args, "--min", "1", "--max", "3", "--per-agent", "1"
    )
    assert made.returncode == 0, made.stderr
    names = ["ro-a", "ro-b"]
    try:
        placed = {}
        for name in names:
            run_until_placed(server, name, pool, demo_image)
            placed[name] = server.fsb_json("get", name)["status"]["assignedAgent"]
        assert len(set(placed.values())) == 2
        manifest = tmp_path / "pool.yaml"
        manifest.write_text(
            f"kind: SandboxPool\nmetadata: {{name: {pool}}}\n"
            "spec:\n  capacity: {poolMin: 1, poolMax: 3}\n  maxSandboxesPerAgent: 1\n"
            "  agentVersion: v2\n"
        )
        applied = server.fsb("apply", "-f", str(manifest))
        assert applied.returncode == 0, applied.stderr
        assert f"pool default/{pool} configured" in applied.stdout

        seen: list[dict] = []  # type: ignore[type-arg]

        def rolled(status: dict) -> bool:  # type: ignore[type-arg]
            agents = status.get("agents", {})
            seen.append(agents)
            return bool(agents.get("updated") == 1 and agents.get("draining") == 2)

        status = wait_pool(server, pool, rolled, timeout=60)["status"]
        assert status["agents"]["total"] == 3 and status["agents"]["ready"] == 3
        for agents in seen:
            # maxSurge 1 over 2 needed agents; maxUnavailable 0: nothing drains before a v2
            # agent is registered and every agent is Ready.
            assert agents.get("total", 0) <= 3, seen
            if agents.get("draining", 0):
                assert agents.get("updated", 0) >= 1, seen
                assert agents.get("ready") == agents.get("total"), seen
        for name, agent in placed.items():
            got = server.fsb_json("get", name)["status"]
            assert (got["phase"], got["assignedAgent"]) == ("Running", agent)

        for name in names:
            deleted = server.fsb("delete", name, "--wait")
            assert deleted.returncode == 0, deleted.stderr
        status = wait_pool(
            server,
            pool,
            lambda st: st["agents"].get("total") == 1 and st["agents"].get("draining", 0) == 0,
        )["status"]
        assert status["agents"]["updated"] == 1
    finally:
        for name in names:
            server.fsb("delete", name, "--wait")
        server.fsb("pool", "delete", pool)
