"""The one leak check of the fault suite: what a real `fsb server` runs against what its records
claim, after the fault and the recovery.

`inventory` reads the truth (containerd's containers, tasks and active snapshots, the shims of
this server's containerd, the network namespaces of this server's agents and sandboxes) and the
records (`fsb list`, the pools' slot counts); `leaks` names every disagreement:

- a container, running task, active snapshot or shim that no record claims (leaked);
- a Running record whose container has no running task (lost: acknowledged but not running);
- a pool whose allocated slots differ from its sandboxes that hold one;
- two records with one container, or two records owning one endpoint (ip:port);
- a network namespace with our prefix whose agent or sandbox is gone;
- a warm slot (a container made ahead of any request, `agent/warm.py`) whose agent is gone, or
  more slots than the pools' agents report ready (a slot of an earlier incarnation of an agent,
  or one cut mid-claim, that nobody removed). Unclaimed slots carry `WARM_SLOT_LABEL`; a claim
  removes it and a record then points at the container.

Only this server's objects count: its containerd is its own (under the data dir), shims are
matched by that containerd's address, and namespaces by the names of its agents (`ip netns`
is host-wide; other test runs make their own at the same time).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastsandbox.agent.warm import SLOT_PREFIX
from fastsandbox.api.labels import AGENT_LABEL, SANDBOX_ID_LABEL, WARM_SLOT_LABEL
from fastsandbox.api.phases import HOLDS_SLOT
from fastsandbox.fleet.netns import NETNS_PREFIX
from tests.e2e._server import Server

HOLDS = {p.value for p in HOLDS_SLOT}


@dataclass
class Inventory:
    containers: set[str]
    running_tasks: set[str]
    active_snapshots: set[str]
    shims: set[str]
    netns: set[str]
    agents: set[str]
    records: list[dict[str, Any]]
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    warm: dict[str, str] = field(default_factory=dict)
    """Unclaimed warm slots: container id → the agent that made it."""

    def summary(self) -> str:
        phases = Counter(r["status"].get("phase", "?") for r in self.records)
        return (
            f"records={len(self.records)} {dict(sorted(phases.items()))} "
            f"containers={len(self.containers)} running_tasks={len(self.running_tasks)} "
            f"active_snapshots={len(self.active_snapshots)} shims={len(self.shims)} "
            f"netns={len(self.netns)} agents={len(self.agents)} warm_slots={len(self.warm)}"
        )

    def warm_reported(self) -> int:
        """Warm slots the pools' agents report ready (their heartbeats, summed per pool)."""
        return sum(
            int(w.get("ready", 0)) for st in self.pools.values() for w in st.get("warmSlots", [])
        )


def _shims(server: Server) -> set[str]:
    """Container ids of the runc shims serving this server's containerd."""
    address = str(server.containerd_socket)
    ids: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if not words or "containerd-shim" not in words[0] or address not in words:
            continue
        if "-id" in words:
            ids.add(words[words.index("-id") + 1])
    return ids


def _agents(server: Server) -> set[str]:
    root = server.data_dir / "agents"
    return {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


def _netns(names: set[str]) -> set[str]:
    """Namespaces with our prefix whose name contains one of `names` (this server's agents and
    sandboxes; per-sandbox namespaces are named by sandbox)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    found = set()
    for line in out.stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(NETNS_PREFIX) and any(n and n in ns for n in names):
            found.add(ns)
    return found


def warm_slots(server: Server) -> tuple[dict[str, str], dict[str, str]]:
    """Unclaimed warm slots (they still carry the warm-slot label) with their agent, and the
    claimed ones: containerd id → the sandbox id the claim labelled it with. A claimed slot
    keeps its `w-` id in containerd while the agent's API and the records name it by sandbox
    id, so the check compares under that name."""
    unclaimed: dict[str, str] = {}
    claimed: dict[str, str] = {}
    for cid in server.ctr("containers", "ls", "-q").split():
        if not cid.startswith(SLOT_PREFIX):
            continue
        with contextlib.suppress(subprocess.CalledProcessError):  # removed meanwhile
            found = json.loads(server.ctr("containers", "info", cid)).get("Labels") or {}
            if WARM_SLOT_LABEL in found:
                unclaimed[cid] = found.get(AGENT_LABEL, "")
            elif found.get(SANDBOX_ID_LABEL):
                claimed[cid] = found[SANDBOX_ID_LABEL]
    return unclaimed, claimed


def active_snapshots(server: Server) -> set[str]:
    rows = [line.split() for line in server.ctr("snapshots", "ls").splitlines()[1:]]
    return {row[0] for row in rows if row and row[-1] == "Active"}


def inventory(server: Server, pools: tuple[str, ...] = ()) -> Inventory:
    records: list[dict[str, Any]] = server.fsb_json("list")["items"]
    agents = _agents(server)
    ids = {r["status"].get("containerID", "") for r in records} | {
        r["metadata"]["name"] for r in records
    }
    pool_status = {}
    for pool in pools:
        got = server.fsb("pool", "get", pool, "-o", "json")
        if got.returncode == 0:
            pool_status[pool] = json.loads(got.stdout)["status"]
    warm, claimed = warm_slots(server)

    def named(ids_: set[str]) -> set[str]:
        return {claimed.get(i, i) for i in ids_}

    containers = named(server.containers())
    return Inventory(
        containers=containers,
        running_tasks=named(server.running_tasks()),
        active_snapshots=named(active_snapshots(server)),
        shims=named(_shims(server)),
        netns=_netns(agents | ids | containers),
        agents=agents,
        records=records,
        pools=pool_status,
        warm=warm,
    )


def leaks(inv: Inventory, *, baseline: Inventory | None = None) -> dict[str, list[str]]:
    """Every disagreement between truth and records (empty: nothing leaked, nothing lost).
    `baseline`: objects that were there before the test (other tests' sandboxes) are not ours."""
    # Unclaimed warm slots of live agents are nobody's record but no leak: checked below.
    before_containers = (baseline.containers if baseline else set()) | {
        cid for cid, agent in inv.warm.items() if agent in inv.agents
    }
    claimed = {r["status"]["containerID"] for r in inv.records if r["status"].get("containerID")}
    running = {
        r["status"]["containerID"]
        for r in inv.records
        if r["status"].get("phase") == "Running" and r["status"].get("containerID")
    }
    found: dict[str, list[str]] = {}

    def add(kind: str, items: set[str] | list[str]) -> None:
        if items:
            found[kind] = sorted(items)

    add("containers without a record", inv.containers - claimed - before_containers)
    add("running tasks without a Running record", inv.running_tasks - running - before_containers)
    add("Running records without a running task", running - inv.running_tasks)
    add("active snapshots without a container", inv.active_snapshots - inv.containers)
    add("shims without a container", inv.shims - inv.containers)
    owners = Counter(
        r["status"]["containerID"] for r in inv.records if r["status"].get("containerID")
    )
    add("containers claimed twice", {c for c, n in owners.items() if n > 1})
    endpoints = Counter(
        ep for r in inv.records if r["status"].get("phase") in HOLDS
        for ep in r["status"].get("endpoints", [])
    )  # fmt: skip
    add("endpoints owned twice", {e for e, n in endpoints.items() if n > 1})
    for pool, status in inv.pools.items():
        holding = sum(
            1
            for r in inv.records
            if r["spec"].get("poolRef", r["spec"].get("pool")) == pool
            and r["status"].get("phase") in HOLDS
        )
        allocated = status.get("slots", {}).get("allocated", 0)
        if allocated != holding:
            found[f"pool {pool} slots"] = [f"allocated={allocated} holding={holding}"]
    add("warm slots of no live agent", {c for c, a in inv.warm.items() if a not in inv.agents})
    mine = sum(1 for a in inv.warm.values() if a in inv.agents)
    if inv.pools and mine != inv.warm_reported():
        found["warm slots the agents do not report"] = [
            f"containers={mine} reported ready={inv.warm_reported()}"
        ]
    live_names = inv.agents | claimed | {r["metadata"]["name"] for r in inv.records}
    add(
        "network namespaces of nothing live",
        {ns for ns in inv.netns if not any(n in ns for n in live_names)},
    )
    return found
