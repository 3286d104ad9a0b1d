"""Placement alone at 1k and 10k fake agents, and the control plane's memory at 10k sandboxes.

Run:  .venv/bin/python benchmarks/scale.py   (no root, no containerd: in-process objects)

- allocate: `Registry.allocate` + `release` on one pool of N ready agents (100 slots each,
  half full, the image cached on every tenth), timed per call with perf_counter over 2000 calls;
  boundary: allocate() called → Allocation returned (placement only; no agent, no store).
  Baseline in the same run: `Registry.place_linear` (the placement rule scanning every agent,
  which is what allocate did before the index), a twentieth as many calls.
- RSS at 10k sandboxes: a fresh Python process holding what a control plane keeps per sandbox
  (the registry's slots over 100 agents, 10k `Sandbox` records in the memory store, the
  SandboxService indexes), VmRSS read from /proc/self/status after a gc; boundary: that
  process's resident memory, interpreter and imports included. Not a live `fsb server` (this
  machine cannot run 10k containers); the SQLite server keeps records on disk, not in memory,
  so this is the upper end for embedded and what a Kubernetes replica's watch view holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Results

SECTION = "scale"

_RSS_PROBE = r"""
import asyncio, gc, json
from fastsandbox.api.models import Sandbox, SandboxPhase
from fastsandbox.control.registry import AgentRecord, Registry
from fastsandbox.store.memory import MemoryStore

async def main():
    registry = Registry()
    for a in range(100):
        registry.upsert_agent(AgentRecord(name=f"a{a}", namespace="default", pool="p",
                                          target=f"unix:/x/{a}", ip="10.0.0.1", capacity=100,
                                          ready=True))
    store = MemoryStore()
    for i in range(10_000):
        agent = f"a{i % 100}"
        sb = Sandbox.model_validate({"apiVersion": "fastsandbox.io/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": f"sb-{i}", "namespace": "default", "labels": {"app": "bench"}},
            "spec": {"image": "127.0.0.1:5000/busybox:latest", "poolRef": "p",
                     "command": ["sleep", "3600"]}})
        sb.status.phase = SandboxPhase.RUNNING
        sb.status.assigned_agent = agent
        sb.status.container_id = f"sb-{i}-0000"
        await store.create(sb)
        registry.adopt(agent, sb.status.container_id, [])
    records = await store.list(Sandbox)
    gc.collect()
    rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
    print(json.dumps({"rss_mb": rss / 1024, "records": len(records)}))

asyncio.run(main())
"""


def _allocate_us(n_agents: int, calls: int = 2000) -> tuple[list[float], list[float]]:
    """allocate() times, and (the baseline) the linear rule's scan over the same agents."""
    from fastsandbox.control.registry import AgentRecord, Registry

    registry = Registry()
    for a in range(n_agents):
        rec = registry.upsert_agent(
            AgentRecord(name=f"a{a}", namespace="default", pool="p", target=f"unix:/x/{a}",
                        ip="10.0.0.1", capacity=100, ready=True,
                        images=frozenset({"img"}) if a % 10 == 0 else frozenset())
        )  # fmt: skip
        for s in range(50):
            registry.adopt(rec.name, f"a{a}-s{s}", ())
    out = []
    for i in range(calls):
        t0 = time.perf_counter()
        alloc = registry.allocate(namespace="default", pool="p", image="img", ports=(),
                                  sandbox_id=f"new-{i}")  # fmt: skip
        out.append((time.perf_counter() - t0) * 1e6)
        registry.release(alloc.agent, alloc.sandbox_id)
    linear = []
    for _ in range(max(3, calls // 20)):
        t0 = time.perf_counter()
        registry.place_linear(namespace="default", pool="p", image="img", ports=())
        linear.append((time.perf_counter() - t0) * 1e6)
    return out, linear


def run(results: Results) -> None:
    print("\n== placement alone and control-plane RSS", flush=True)
    for n in (1_000, 10_000):
        values, linear = _allocate_us(n)
        boundary = "Registry.allocate() called -> Allocation returned (placement only)"
        results.add(SECTION, f"allocate at {n} agents (us)", values, boundary, unit="us")
        boundary = "Registry.place_linear() (the rule scanning every agent, the old path)"
        results.add(SECTION, f"linear scan at {n} agents (us)", linear, boundary, unit="us")
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    rss = json.loads(out.splitlines()[-1])["rss_mb"]
    boundary = "VmRSS of a process holding registry + 10k records + indexes (in-process)"
    results.value(SECTION, "control-plane RSS at 10k sandboxes", "MB", rss, boundary)


def main() -> int:
    run(Results())
    return 0


if __name__ == "__main__":
    sys.exit(main())
