"""The janitor: remove what our sandboxes left behind once nobody owns it any more.

Every `interval` it lists the containers carrying our labels, asks the control plane what is
alive (`KnownState`: live agents, container ids that records point at, creates in flight) and
lets the pure `scanner.decide` pick the orphans; an orphan is removed (task, container and
snapshot, through `Runtime.delete`) only after it has been seen orphaned for `orphan_timeout`
without a break. Then it sweeps what a container leaves outside containerd's records:

- log files under `<agents_dir>/<agent>/logs/<id>.log` (and the older half of a capped log,
  `<id>.log.1`) whose container is gone and that no record points at, untouched for
  `orphan_timeout`; supervisor channel directories (`<agents_dir>/<agent>/channels/<id>/`) by
  the same rule;
- active snapshots keyed like a sandbox id that no container in the namespace references
  (an interrupted delete), older than `orphan_timeout` (needs a `Leftovers` backend);
- task FIFOs (`<fifo dir>/<dir>/<id>-stdin|stdout|stderr`) of containers this janitor removed.
  The FIFO dir is client-side (containerd's Go client and `ctr` use `/run/containerd/fifo`
  whichever containerd they talk to) and is removed by the client when it closes the task's IO;
  a detached client (`ctr run -d`) leaves them. Our own sandboxes use `binary://` (or
  `file://`) logs and no stdin, so they have none; only such clients' containers with our
  labels do.

It never removes a container that a record points at while its agent lives, nor one being
created, nor one that is not ours (see `scanner`). `on_removed(id)` is called after each
removal, so the control plane can release a slot it kept for the orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import stat
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fastsandbox.agent.runtime.base import Runtime
from fastsandbox.agent.runtime.disk import WritableLayers
from fastsandbox.agent.runtime.spare_layers import SPARE_PREFIX
from fastsandbox.errors import FsbError
from fastsandbox.janitor.images import ImageCollector
from fastsandbox.janitor.scanner import Known, Reason, Seen, decide

log = logging.getLogger(__name__)

# An orphan nobody waits for: SIGTERM, then SIGKILL soon after.
DEFAULT_GRACE_SECONDS = 1.0
# containerd's id rule, which our sandbox ids (and the snapshot keys made from them) follow.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,75}$")
_FIFO = re.compile(r"^(?P<id>.+)-(?:stdin|stdout|stderr)$")
# A create whose container exists finishes in well under a second; a slot "in flight" this long
# was never released (a failed create whose cleanup failed too) and no longer shields it.
DEFAULT_IN_FLIGHT_TIMEOUT = 300.0
# How many removed ids to remember for the FIFO sweep.
_REMOVED_MEMORY = 4096


class KnownState(Protocol):
    """What the control plane knows; implemented for the embedded server in `embedded.py`."""

    async def live_agents(self) -> set[str]: ...

    async def recorded_container_ids(self) -> set[str]: ...


@dataclass(frozen=True, slots=True)
class SnapshotSeen:
    key: str
    active: bool
    created_at: float
    """Wall-clock seconds."""


class Leftovers(Protocol):
    """Runtime details beyond the `Runtime` seam (containerd: `janitor/containerd.py`)."""

    async def log_paths(self) -> dict[str, str]:
        """Where each container's task writes its output, by container id."""
        ...

    async def container_ids(self) -> set[str]:
        """Every container in the namespace, whatever its labels."""
        ...

    async def snapshots(self) -> list[SnapshotSeen]: ...

    async def remove_snapshot(self, key: str) -> None: ...


@dataclass(slots=True)
class ScanReport:
    removed: dict[str, Reason] = field(default_factory=dict)
    waiting: dict[str, Reason] = field(default_factory=dict)
    logs_removed: list[str] = field(default_factory=list)
    snapshots_removed: list[str] = field(default_factory=list)
    fifos_removed: list[str] = field(default_factory=list)
    images_removed: list[str] = field(default_factory=list)
    layers_removed: list[str] = field(default_factory=list)
    errors: int = 0


class Janitor:
    def __init__(
        self,
        runtime: Runtime,
        known: KnownState,
        *,
        orphan_timeout: float,
        interval: float,
        in_flight: Callable[[], Collection[str]] = frozenset,
        on_removed: Callable[[str], None] | None = None,
        agents_dir: Path | None = None,
        leftovers: Leftovers | None = None,
        fifo_dir: Path | None = None,
        images: ImageCollector | None = None,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        in_flight_timeout: float | None = DEFAULT_IN_FLIGHT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.known = known
        self.orphan_timeout = orphan_timeout
        self.interval = interval
        self.in_flight = in_flight
        self.on_removed = on_removed
        self.agents_dir = agents_dir
        self.leftovers = leftovers
        self.fifo_dir = fifo_dir
        # Least recently used images deleted while the cache is over its budget (images.py).
        self.images = images
        self.grace_seconds = grace_seconds
        self.in_flight_timeout = in_flight_timeout
        self._clock = clock
        self._wall = wall_clock
        self._orphaned_since: dict[str, float] = {}
        # Agents seen live by an earlier scan: their containers stay ours after they are gone.
        self._our_agents: set[str] = set()
        self._removed: deque[str] = deque(maxlen=_REMOVED_MEMORY)

    async def run(self) -> None:
        """Scan every `interval` until cancelled. A failed scan is logged; the next one retries."""
        while True:
            try:
                await self.scan()
            except FsbError as exc:
                log.warning("janitor scan failed", extra={"err": exc.message})
            await asyncio.sleep(self.interval)

    async def scan(self) -> ScanReport:
        report = ScanReport()
        # What exists first, then what is known: a container created in between is either in
        # flight or recorded by the time we ask, never mistaken for an orphan.
        states = await self.runtime.list()
        log_paths = await self.leftovers.log_paths() if self.leftovers else {}
        live = await self.known.live_agents()
        recorded = await self.known.recorded_container_ids()
        in_flight = frozenset(self.in_flight())
        self._our_agents |= live
        known = Known(
            live_agents=frozenset(live),
            recorded=frozenset(recorded),
            in_flight=in_flight,
            our_agents=frozenset(self._our_agents),
            agents_dir=str(self.agents_dir) if self.agents_dir else None,
        )
        seen = [Seen(s.id, s.labels, log_paths.get(s.id)) for s in states]
        decision = decide(
            seen,
            known,
            self._orphaned_since,
            orphan_timeout=self.orphan_timeout,
            now=self._clock(),
            in_flight_timeout=self.in_flight_timeout,
        )
        self._orphaned_since = dict(decision.orphaned_since)
        report.waiting = dict(decision.waiting)
        for removal in decision.remove:
            try:
                await self.runtime.delete(removal.id, self.grace_seconds)
            except FsbError as exc:
                report.errors += 1
                log.warning(
                    "could not remove orphan container; retrying next scan",
                    extra={"sandbox_id": removal.id, "err": exc.message},
                )
                continue
            self._orphaned_since.pop(removal.id, None)
            self._removed.append(removal.id)
            report.removed[removal.id] = removal.reason
            log.warning(
                "removed orphan container",
                extra={
                    "sandbox_id": removal.id,
                    "agent": removal.agent,
                    "reason": str(removal.reason),
                    "orphaned_seconds": round(removal.orphaned_for, 1),
                },
            )
            if self.on_removed is not None:
                try:
                    self.on_removed(removal.id)
                except Exception:
                    log.exception("on_removed hook failed", extra={"sandbox_id": removal.id})

        existing = {s.id for s in states} - set(report.removed)
        keep = existing | recorded | in_flight
        report.logs_removed = self._sweep_logs(keep) + self._sweep_channels(keep)
        if self.leftovers is not None:
            report.snapshots_removed = await self._sweep_snapshots(in_flight)
        report.fifos_removed = self._sweep_fifos(existing)
        report.layers_removed = await self._sweep_layers(existing | in_flight)
        if self.images is not None:
            report.images_removed = await self.images.collect()
        return report

    # -- leftovers -------------------------------------------------------------------------------
    def _old(self, created_wall: float) -> bool:
        return self._wall() - created_wall >= self.orphan_timeout

    def _remove_if_old(self, path: Path, remove: Callable[[Path], object], what: str) -> bool:
        """Remove `path` (with `remove`) once it is older than the orphan timeout; True when
        this call removed it (gone already, or not removable: logged, False)."""
        try:
            if not self._old(path.stat().st_mtime):
                return False
            remove(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning(
                f"could not remove stale {what}", extra={"path": str(path), "err": str(exc)}
            )
            return False
        log.info(f"removed stale {what}", extra={"path": str(path)})
        return True

    def _sweep_logs(self, keep: Collection[str]) -> list[str]:
        """Log files of containers that are gone and that no record points at."""
        if self.agents_dir is None:
            return []
        removed = []
        paths = [*self.agents_dir.glob("*/logs/*.log"), *self.agents_dir.glob("*/logs/*.log.1")]
        for path in paths:
            if path.name.removesuffix(".1").removesuffix(".log") in keep:
                continue
            if self._remove_if_old(path, Path.unlink, "log file"):
                removed.append(str(path))
        return removed

    def _sweep_channels(self, keep: Collection[str]) -> list[str]:
        """Channel directories (a socket inside) of sandboxes that are gone."""
        if self.agents_dir is None:
            return []
        removed = []
        for path in self.agents_dir.glob("*/channels/*"):
            if path.name in keep or not _ID.match(path.name) or not path.is_dir():
                continue
            if self._remove_if_old(path, shutil.rmtree, "channel directory"):
                removed.append(str(path))
        return removed

    async def _sweep_layers(self, keep: Collection[str]) -> list[str]:
        """Size-limited writable layers (`<agent>/runtime/disks/<id>`, agent/runtime/disk.py)
        whose container is gone: a removal cut short between the container and its layer."""
        if self.agents_dir is None:
            return []
        removed = []
        for root in self.agents_dir.glob("*/runtime/disks"):
            # Spare images (agent/runtime/spare_layers.py) an agent that died left: plain files
            # (or a format's template dir), never mounted; a live agent skips one gone.
            for spare in root.glob(f"{SPARE_PREFIX}*"):
                remove = shutil.rmtree if spare.is_dir() else Path.unlink
                if self._remove_if_old(spare, remove, "spare writable layer"):
                    removed.append(str(spare))
            layers = WritableLayers(root)
            for container_id in layers.known():
                if container_id in keep or not _ID.match(container_id):
                    continue
                try:
                    image = layers.image_path(container_id)
                    path = image if image.exists() else layers.mount_path(container_id)
                    if not self._old(path.stat().st_mtime):
                        continue
                    await layers.remove(container_id)
                except FileNotFoundError:
                    continue
                except (OSError, FsbError) as exc:
                    log.warning(
                        "could not remove stale writable layer",
                        extra={"sandbox_id": container_id, "err": str(exc)},
                    )
                    continue
                removed.append(str(layers.mount_path(container_id)))
                log.info("removed stale writable layer", extra={"sandbox_id": container_id})
        return removed

    async def _sweep_snapshots(self, in_flight: Collection[str]) -> list[str]:
        """Active snapshots keyed like a sandbox id that no container references."""
        assert self.leftovers is not None
        snapshots = await self.leftovers.snapshots()
        # After the snapshot list: a create makes its container before its snapshot.
        containers = await self.leftovers.container_ids()
        removed = []
        for snap in snapshots:
            if (
                not snap.active
                or not _ID.match(snap.key)
                or snap.key in containers
                or snap.key in in_flight
                or not self._old(snap.created_at)
            ):
                continue
            try:
                await self.leftovers.remove_snapshot(snap.key)
            except FsbError as exc:
                log.warning(
                    "could not remove stale snapshot", extra={"key": snap.key, "err": exc.message}
                )
                continue
            removed.append(snap.key)
            log.info("removed stale snapshot", extra={"key": snap.key})
        return removed

    def _sweep_fifos(self, existing: Collection[str]) -> list[str]:
        """FIFOs of containers this janitor removed (left when the client that made them is
        gone); FIFO directories left empty go too."""
        if self.fifo_dir is None or not self._removed:
            return []
        ours = set(self._removed) - set(existing)
        removed = []
        for path in _fifo_files(self.fifo_dir.glob("*/*")):
            match = _FIFO.match(path.name)
            if match is None or match["id"] not in ours:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(str(path))
                log.info("removed stale fifo", extra={"path": str(path)})
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only succeeds once empty
        return removed


def _fifo_files(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                yield path
