"""Fixtures of the fault-injection suite (issue 12): one real `fsb server` for the package, the
size of each scenario, and the shared helpers (waits, agent processes, the leak check).

Size: `FSB_FAULT_ROUNDS` rounds per scenario (default 1 in `make test`; `make fault` runs 20),
`FSB_FAULT_CREATES` / `FSB_FAULT_CAPACITY` for the admission race (default 100 against 10;
`make fault`: 500 against 50).

The server runs with a janitor orphan timeout of 10 minutes: nothing a scenario checks can be
the janitor's doing, so a leak the fault made shows, and fencing is the heartbeat's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastsandbox.sdk import AsyncClient
from tests.e2e._server import Server, new_server, purge
from tests.fault._leaks import Inventory, inventory, leaks

ROUNDS = int(os.environ.get("FSB_FAULT_ROUNDS", "1"))
ORPHAN_TIMEOUT = 600


@pytest.fixture(scope="session")
def registry_addr(registry: Any) -> str:
    addr: str = registry.addr
    return addr


@pytest.fixture(scope="package")
def server(registry_addr: str) -> Iterator[Server]:
    srv = new_server(registry_addr, "--orphan-timeout", str(ORPHAN_TIMEOUT))
    # The slow-store scenario's hook (store/faults.py): no file, no delay.
    srv.extra_args += ["--fault-store-delay-file", str(store_delay_file(srv))]
    try:
        srv.start()
        yield srv
    finally:
        purge(srv)


def store_delay_file(server: Server) -> Path:
    return server.data_dir / "fault-store-delay"


def set_store_delay(server: Server, value: str | None) -> None:
    """Seconds the store waits before each write, `hold` (until told otherwise), None: none."""
    path = store_delay_file(server)
    if value is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(value + "\n")


def sdk_client(server: Server, timeout: float = 120) -> AsyncClient:
    """An SDK client of `server`: its admin token and the CA it made (TLS on loopback too)."""
    return AsyncClient(
        server.endpoint, server.token, "default", ca_file=server.ca_file, timeout=timeout
    )


def until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; a liveness bound, not a speed claim."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(every)


def created_again(
    prefix: str, create: Callable[[str], bool], refused: list[str], timeout: float
) -> str:
    """Service resumes by itself: `create(name)` (a new name `<prefix>-N` each try) succeeds
    within `timeout`; the names tried before are appended to `refused`."""
    attempt = 0

    def created() -> str | None:
        nonlocal attempt
        name = f"{prefix}-{attempt}"
        attempt += 1
        if create(name):
            return name
        refused.append(name)
        return None

    got: str = until(f"{prefix}: creates work again", created, timeout, 1.0)
    return got


def make_pool(
    server: Server,
    name: str,
    *,
    agents: int,
    per_agent: int,
    network_mode: str = "private",
    extra: tuple[str, ...] = (),
) -> None:
    made = server.fsb(
        "pool", "create", name, "--min", str(agents), "--max", str(agents),
        "--per-agent", str(per_agent), "--network-mode", network_mode, *extra,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    until(f"pool {name}: {agents} ready agents", lambda: ready_agents(server, name) == agents, 90)


def ready_agents(server: Server, pool: str) -> int:
    got = server.fsb("pool", "get", pool, "-o", "json")
    if got.returncode != 0:
        return -1
    ready: int = json.loads(got.stdout)["status"]["agents"].get("ready", 0)
    return ready


def warm_ready(server: Server, pool: str) -> int:
    """Warm slots the pool's agents report ready (`status.warmSlots`)."""
    got = server.fsb("pool", "get", pool, "-o", "json")
    if got.returncode != 0:
        return -1
    return sum(int(w.get("ready", 0)) for w in json.loads(got.stdout)["status"]["warmSlots"])


def drop_pool(server: Server, pool: str) -> None:
    names = [
        i["metadata"]["name"]
        for i in server.fsb_json("list")["items"]
        if i["spec"].get("poolRef") == pool
    ]
    for name in names:
        server.fsb("delete", name, "--wait")
    server.fsb("pool", "delete", pool)


def agent_pid(server: Server, agent: str) -> int:
    state = json.loads((server.data_dir / "agents" / agent / "agent.json").read_text())
    pid: int = state["pid"]
    return pid


def status(server: Server, name: str) -> dict[str, Any]:
    got: dict[str, Any] = server.fsb_json("get", name)["status"]
    return got


def settled_leaks(
    server: Server, pools: tuple[str, ...], timeout: float = 30.0
) -> tuple[Inventory, dict[str, list[str]]]:
    """The leak check once the system had time to converge (pool status is written by the next
    pool pass, a delete finishes after its reply): the last result at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        inv = inventory(server, pools)
        found = leaks(inv)
        if not found or time.monotonic() > deadline:
            return inv, found
        time.sleep(0.5)


def report(scenario: str, inv: Inventory, found: dict[str, list[str]], **figures: object) -> None:
    extra = " ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[{scenario}] {inv.summary()} {extra} leaks found={sum(map(len, found.values()))}")
    assert not found, json.dumps(found, indent=1)


def resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def read_log(server: Server) -> list[dict[str, Any]]:
    path: Path = server.data_dir / "server.log"
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
