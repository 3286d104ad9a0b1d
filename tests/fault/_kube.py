"""What the Kubernetes-shape fault scenarios share (tests/fault/test_kube_faults.py):

- `Gate`: a TCP forwarder on 127.0.0.1 between one controller replica and the apiserver, which
  the test can `cut` (a network partition: connections stay open and new ones are accepted,
  but not a byte passes either way; nothing is dropped, as TCP retransmits through a real
  partition) and `heal`. It forwards bytes only (TLS passes through untouched: the replica's
  kubeconfig names `127.0.0.1:<gate port>` and the apiserver's certificate is for 127.0.0.1).
  No firewall rule is touched: the partition is ours alone, and only the gated replica is cut.
  `drop` (during a cut) closes every connection and throws away what was held: what a replica
  sent before it was killed never arrives, as with a real partition that outlives the process.
- `kube_inventory`: the leak check's truth for a `KubeServer` (tests/fault/_leaks.py compares it
  with the records): the session's containerd is shared with other tests of the session, so
  only the containers of this server's agents count, and snapshots and shims against a baseline
  taken before the scenario.
- `leading_intervals`: when each replica led, from its own log ("leading:" when the
  reconcilers start, "... stopped leading" when the elector cancels them), to check that no two
  replicas ever led at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from fastsandbox.api.labels import AGENT_LABEL
from tests.e2e._kube_server import KubeServer
from tests.fault._leaks import Inventory, active_snapshots

_CHUNK = 65536


class Gate:
    """See the module docstring. Runs its own event loop in a thread (the tests are synchronous)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._open: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # Bumped by `drop`: a pump of an older generation delivers nothing more.
        self._generation = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="gate")
        self.connections = 0

    def start(self) -> int:
        self._thread.start()

        async def start() -> int:
            self._open = asyncio.Event()
            self._open.set()
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            port: int = self._server.sockets[0].getsockname()[1]
            return port

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self.port

    def cut(self) -> None:
        assert self._open is not None
        self.loop.call_soon_threadsafe(self._open.clear)

    def heal(self) -> None:
        assert self._open is not None
        self.loop.call_soon_threadsafe(self._open.set)

    def drop(self) -> None:
        """During a cut: end every connection through the gate, delivering nothing it held."""

        async def drop() -> None:
            self._generation += 1
            for writer in list(self._writers):
                writer.close()

        asyncio.run_coroutine_threadsafe(drop(), self.loop).result(10)

    def stop(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            if self._open is not None:
                self._open.set()  # pumps waiting on a cut end now

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        self.connections += 1
        self._writers.add(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            await self._open.wait()  # a connection made during a cut is held, not refused
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
            self._writers.add(upstream_writer)
            generation = self._generation
            await asyncio.gather(
                self._pump(reader, upstream_writer, generation),
                self._pump(upstream_reader, writer, generation),
            )
        except OSError:
            pass
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, generation: int
    ) -> None:
        assert self._open is not None
        try:
            while True:
                data = await reader.read(_CHUNK)
                await self._open.wait()  # cut: held here, delivered once healed
                if not data or generation != self._generation:
                    break  # ended, or dropped: what was held is thrown away
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()


def gated_kubeconfig(kubeconfig: Path, port: int, out: Path) -> Path:
    """A copy of `kubeconfig` whose cluster is reached through 127.0.0.1:`port`."""
    config = yaml.safe_load(kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{port}"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def _shim_ids(socket: Path) -> set[str]:
    address = str(socket)
    ids: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            words = [
                a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")
            ]
        except OSError:
            continue
        if words and "containerd-shim" in words[0] and address in words and "-id" in words:
            ids.add(words[words.index("-id") + 1])
    return ids


def agent_pods(server: KubeServer) -> set[str]:
    """The agent Pods of this server that run now (the kubelet also remembers stopped ones)."""
    assert server.kubelet is not None
    return {p for p in server.kubelet.pods() if server.kubelet.pid("default", p) is not None}


def kube_inventory(
    server: KubeServer, pools: tuple[str, ...], baseline: Inventory | None = None
) -> Inventory:
    """This server's truth and records, in the shape `tests.fault._leaks.leaks` compares.
    With `baseline`, snapshots and shims that were there before (other tests') are left out."""
    records: list[dict[str, Any]] = server.fsb_json("list")["items"]
    everyone = server.kubelet.pods() if server.kubelet is not None else set()
    ours: set[str] = set()
    for agent in everyone:
        ours |= set(
            server.ctr("containers", "ls", "-q", f'labels."{AGENT_LABEL}"=={agent}').split()
        )
    all_containers = server.containers()
    pool_status = {}
    for pool in pools:
        got = server.fsb("pool", "get", pool, "-o", "json")
        if got.returncode == 0:
            pool_status[pool] = json.loads(got.stdout)["status"]
    # Objects of other tests of the session (other containerd namespaces, earlier modules)
    # cannot be told apart by name: only those new since the baseline that no other test's
    # container of k8s.io claims count.
    others = all_containers - ours
    snapshots = active_snapshots(server) - (baseline.active_snapshots if baseline else set())
    shims = _shim_ids(server.containerd_socket) - (baseline.shims if baseline else set())
    return Inventory(
        containers=ours,
        running_tasks=server.running_tasks() & ours,
        active_snapshots=snapshots - others,
        shims=shims - others,
        netns=set(),  # agents in Pods run shared networks only (no namespaces of their own)
        agents=agent_pods(server),
        records=records,
        pools=pool_status,
    )


def log_stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# What the elector logs as it cancels the leading work (`_kube/lease.py`): from then on the
# replica starts nothing (its loops end at their next await; a request already sent finishes
# and its answer is dropped), then "following:" once every loop has ended.
ENDS = ("stopped leading", "stepping down", "lease released", "lease not released", "following:")


def leading_intervals(server: KubeServer) -> list[tuple[int, float, float]]:
    """(replica, began, ended) for every time a replica led, from the replicas' logs: from
    "leading:" (the reconcilers start) to the first of `ENDS`; one that still leads ends at
    +inf."""
    out: list[tuple[int, float, float]] = []
    for index, replica in enumerate(server.replicas):
        began: float | None = None
        if not replica.log.exists():
            continue
        for line in replica.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            event = str(entry.get("event", ""))
            if event.startswith("leading:") and began is None:
                began = log_stamp(entry["timestamp"])
            elif began is not None and any(word in event for word in ENDS):
                out.append((index, began, log_stamp(entry["timestamp"])))
                began = None
        if began is not None:
            out.append((index, began, float("inf")))
    return out


def overlaps(intervals: list[tuple[int, float, float]]) -> list[str]:
    """Every pair of intervals of different replicas that share a moment."""
    found = []
    for i, (ra, a0, a1) in enumerate(intervals):
        for rb, b0, b1 in intervals[i + 1 :]:
            if ra != rb and a0 < b1 and b0 < a1:
                found.append(f"replica {ra} [{a0:.3f}, {a1:.3f}] and {rb} [{b0:.3f}, {b1:.3f}]")
    return found
