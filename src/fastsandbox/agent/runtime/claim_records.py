"""A claimed warm slot's record: written to containerd just after the create is answered, and made
to survive a kill -9 of the agent before it is answered by a journal entry.

Why it is shaped this way:
- The record (`Containers.Update` of the container's labels and OCI spec, so recovery,
  `process_defaults` and the janitor read the sandbox, not a warm slot) is a bolt transaction
  with an fsync inside containerd: the largest step of a claim, and one the user's process does
  not need. The guarantee it gives is that an acknowledged create survives a kill -9 of the
  agent: a restarted agent must find the sandbox, never a warm slot to remove. A journal entry
  gives the same before the answer, for a few syscalls: one small file per claim under the
  runtime's state directory, written (temp file + rename, so it is whole or absent) after the
  main process started, removed once containerd has the record.
- No fsync: the entry must outlive the agent's process, which the page cache does. A host
  crash ends the sandbox itself (its processes do not survive a reboot); without the entry the
  restarted agent removes the container as an unclaimed slot and the control plane reads the
  sandbox as lost instead of exited — the one difference, and only in the milliseconds between
  the answer and the record.
- Until containerd has the record, this runtime's own reads show what it will hold: `get` and
  `list` the sandbox's labels, `process_defaults` its process. Status, a control plane rebuilding
  its records from the request label, and the first exec all see the sandbox at once.
- A restarted runtime replays the entries before its first read (`replay`): a container still
  labelled a warm slot gets its record then. Entries name their containerd socket and namespace,
  so a runtime sharing the directory (tests) never acts on another's.
- The write retries while containerd is unavailable (the answer is given; giving up would leave a
  sandbox that reads as a warm slot); a container deleted meanwhile ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from fastsandbox.agent.runtime._containerd_api import ContainerdApi
from fastsandbox.agent.runtime.base import ContainerState
from fastsandbox.agent.runtime.warm_claim import claimed_oci
from fastsandbox.api import labels
from fastsandbox.api._proto.fastsandbox.v1 import containerd_subset_pb2 as pb
from fastsandbox.errors import FsbError, NotFound, Unavailable

log = logging.getLogger(__name__)

SUFFIX = ".claim.json"
# How long a delete waits for a record write in flight before removing the container anyway.
SETTLE_SECONDS = 5.0
_RETRY_FIRST, _RETRY_MAX = 0.05, 2.0


@dataclass(frozen=True, slots=True)
class Claimed:
    """What the record of a claimed slot needs beyond the slot's own (its OCI spec)."""

    sandbox_id: str
    argv: Sequence[str]
    env: Sequence[str]
    cwd: str
    resources: Mapping[str, Any]
    labels: Mapping[str, str]
    scope: str = ""
    container_id: str = ""
    version: int = 1

    def to_json(self) -> bytes:
        value = asdict(self)
        value["argv"], value["env"] = list(self.argv), list(self.env)
        value["resources"], value["labels"] = dict(self.resources), dict(self.labels)
        return json.dumps(value, separators=(",", ":")).encode()

    @staticmethod
    def from_json(data: bytes) -> Claimed:
        value = json.loads(data)
        return Claimed(
            sandbox_id=str(value["sandbox_id"]),
            argv=[str(a) for a in value["argv"]],
            env=[str(e) for e in value["env"]],
            cwd=str(value["cwd"]),
            resources=dict(value["resources"]),
            labels={str(k): str(v) for k, v in value["labels"].items()},
            scope=str(value.get("scope", "")),
            container_id=str(value.get("container_id", "")),
        )


def record_of(
    container: pb.CtdContainer, oci: Mapping[str, Any], claim: Claimed
) -> pb.CtdContainer:
    """The slot's container record rewritten to what a cold create of the sandbox stores."""
    record = claimed_oci(
        oci,
        sandbox_id=claim.sandbox_id,
        argv=claim.argv,
        env=claim.env,
        cwd=claim.cwd,
        resources=claim.resources,
    )
    updated = pb.CtdContainer()
    updated.CopyFrom(container)
    updated.labels.clear()
    updated.labels.update(claim.labels)
    updated.spec.value = json.dumps(record).encode()
    return updated


@dataclass(slots=True)
class _Pending:
    claim: Claimed
    oci: Mapping[str, Any]
    task: asyncio.Task[None] | None = None


class ClaimRecords:
    def __init__(self, api: ContainerdApi, directory: Path, scope: str) -> None:
        self._api = api
        self.directory = directory
        self.scope = scope
        self._pending: dict[str, _Pending] = {}
        self._replayed = False
        self._replay_lock = asyncio.Lock()

    # -- a claim --------------------------------------------------------------------------------
    def begin(self, container: pb.CtdContainer, oci: Mapping[str, Any], claim: Claimed) -> None:
        """Journal `claim` (durable against a kill -9 once this returns), then write its record
        to containerd in the background. Raises OSError when the entry cannot be written."""
        cid = container.id
        claim = replace(claim, scope=self.scope, container_id=cid)
        self._write_entry(cid, claim.to_json())
        pending = _Pending(claim, oci)
        self._pending[cid] = pending
        pending.task = asyncio.get_running_loop().create_task(
            self._record(container, pending), name=f"claim record {cid}"
        )

    def overlay(self, state: ContainerState) -> ContainerState:
        """`state` with the labels its record will hold once written."""
        pending = self._pending.get(state.id)
        if pending is None:
            return state
        return replace(state, labels=dict(pending.claim.labels))

    def process(self, container_id: str) -> Mapping[str, Any] | None:
        """The OCI spec the record will hold (None: no record in flight)."""
        pending = self._pending.get(container_id)
        if pending is None:
            return None
        c = pending.claim
        return claimed_oci(
            pending.oci,
            sandbox_id=c.sandbox_id,
            argv=c.argv,
            env=c.env,
            cwd=c.cwd,
            resources=c.resources,
        )

    async def settle(self, container_id: str) -> None:
        """Before a delete: wait (bounded) for the record in flight, then forget the claim."""
        pending = self._pending.get(container_id)
        if pending is not None and pending.task is not None and not pending.task.done():
            with contextlib.suppress(TimeoutError, FsbError):
                async with asyncio.timeout(SETTLE_SECONDS):
                    await asyncio.shield(pending.task)
            pending.task.cancel()
        self._pending.pop(container_id, None)
        self._remove_entry(container_id)

    async def _record(self, container: pb.CtdContainer, pending: _Pending) -> None:
        cid = container.id
        delay = _RETRY_FIRST
        try:
            while True:
                try:
                    await self._api.update_container(
                        record_of(container, pending.oci, pending.claim), ["labels", "spec"]
                    )
                    break
                except NotFound:
                    break  # deleted meanwhile: nothing left to record
                except Unavailable as exc:
                    log.warning(
                        "claim record: containerd unavailable; retrying",
                        extra={"sandbox": cid, "err": str(exc)},
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Kept: the entry stays, and the next agent start writes the record from it.
            log.exception("claim record failed; the journal keeps it", extra={"sandbox": cid})
            return
        if self._pending.get(cid) is pending:
            del self._pending[cid]
            self._remove_entry(cid)

    # -- after a restart ------------------------------------------------------------------------
    async def replay(self) -> None:
        """Write the records of claims an earlier process answered but did not record (once;
        before any read of containers)."""
        if self._replayed:
            return
        async with self._replay_lock:
            if self._replayed:
                return
            for path in sorted(self.directory.glob(f"*{SUFFIX}")):
                await self._replay_one(path)
            self._replayed = True

    async def _replay_one(self, path: Path) -> None:
        try:
            claim = Claimed.from_json(path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning(
                "unreadable claim entry removed", extra={"path": str(path), "err": str(exc)}
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        if claim.scope != self.scope or not claim.container_id:
            return  # another runtime's (another containerd or namespace)
        cid = claim.container_id
        if cid in self._pending:
            return
        try:
            container = await self._api.get_container(cid)
        except NotFound:
            self._remove_entry(cid)
            return
        if labels.WARM_SLOT_LABEL in container.labels:
            oci = json.loads(container.spec.value or b"{}")
            await self._api.update_container(record_of(container, oci, claim), ["labels", "spec"])
            log.info(
                "recorded a claim answered before a restart",
                extra={"sandbox": cid, "sandbox_id": claim.sandbox_id},
            )
        self._remove_entry(cid)

    async def close(self) -> None:
        """Let records in flight finish (bounded); what is left stays journalled."""
        tasks = [p.task for p in self._pending.values() if p.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=SETTLE_SECONDS)

    # -- the journal ----------------------------------------------------------------------------
    def _path(self, container_id: str) -> Path:
        return self.directory / f"{container_id}{SUFFIX}"

    def _write_entry(self, container_id: str, data: bytes) -> None:
        path = self._path(container_id)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _remove_entry(self, container_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(container_id).unlink()
