"""A claimed warm slot's record: written to containerd just after the create is answered, and made
to survive a kill -9 of the agent before it is answered by a journal entry.

Why it is shaped this way:
- The record (`Containers.Update` of the container's labels and OCI spec, so recovery,
  `process_defaults` and the janitor read the sandbox, not a warm slot) is a bolt transaction
  with an fsync inside containerd: the largest step of a claim, and one the user's process does
  not need. The guarantee it gives is that an acknowledged create survives a kill -9 of the
  agent: a restarted agent must find the sandbox, never a warm slot to remove. A journal entry
  gives the same before the answer, for one syscall: a line appended (`O_APPEND`, one `write`)
  to `claims.log` under the runtime's state directory after the main process started, and a
  `done` line once containerd has the record; the file is emptied whenever no record is in
  flight. A file per claim cost 0.3 to 0.8 ms here (ext4 creates under load); an append to an
  open file is tens of microseconds. A line cut short can only be the last one, by a process
  that died writing it (before it answered): it is skipped.
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
  so a runtime sharing the directory (test helpers, which never claim) never acts on another's;
  one claiming runtime per directory (the agent's own).
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

JOURNAL = "claims.log"
# The record write starts this long after the claim: right away, its CPU (the record's JSON, the
# RPC) and containerd's transaction would sit between the claim and its answer on the way out,
# and the sandbox's first command comes just after that answer.
RECORD_DELAY_SECONDS = 0.05
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
    def from_value(value: Mapping[str, Any]) -> Claimed:
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
    container: pb.CtdContainer
    claim: Claimed
    oci: Mapping[str, Any]
    task: asyncio.Task[None] | None = None


class ClaimRecords:
    def __init__(self, api: ContainerdApi, directory: Path, scope: str) -> None:
        self._api = api
        self.directory = directory
        self.scope = scope
        self._pending: dict[str, _Pending] = {}
        self._fd: int | None = None
        self._replayed = False
        self._replay_lock = asyncio.Lock()

    # -- a claim --------------------------------------------------------------------------------
    def begin(self, container: pb.CtdContainer, oci: Mapping[str, Any], claim: Claimed) -> None:
        """Journal `claim` (durable against a kill -9 once this returns), then write its record
        to containerd in the background. Raises OSError when the entry cannot be written."""
        cid = container.id
        claim = replace(claim, scope=self.scope, container_id=cid)
        self._append(b'{"claim":' + claim.to_json() + b"}\n")
        pending = _Pending(container, claim, oci)
        self._pending[cid] = pending
        asyncio.get_running_loop().call_later(RECORD_DELAY_SECONDS, self._start_record, pending)

    def _start_record(self, pending: _Pending) -> None:
        cid = pending.container.id
        if self._pending.get(cid) is pending and pending.task is None:
            pending.task = asyncio.get_running_loop().create_task(
                self._record(pending), name=f"claim record {cid}"
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
        if self._pending.pop(container_id, None) is not None:
            self._done(container_id)

    async def _record(self, pending: _Pending) -> None:
        container, cid = pending.container, pending.container.id
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
            self._done(cid)

    # -- after a restart ------------------------------------------------------------------------
    async def replay(self) -> None:
        """Write the records of claims an earlier process answered but did not record (once;
        before any read of containers)."""
        if self._replayed:
            return
        async with self._replay_lock:
            if self._replayed:
                return
            left = unrecorded(self.directory)
            foreign = False
            for cid, claim in left.items():
                if claim.scope != self.scope:
                    foreign = True  # another containerd's or namespace's: not ours to touch
                elif cid not in self._pending:
                    await self._replay_one(cid, claim)
            if left and not foreign and not self._pending:
                self._truncate()
            self._replayed = True

    async def _replay_one(self, cid: str, claim: Claimed) -> None:
        try:
            container = await self._api.get_container(cid)
        except NotFound:
            return  # removed since: nothing to record
        if labels.WARM_SLOT_LABEL in container.labels:
            oci = json.loads(container.spec.value or b"{}")
            await self._api.update_container(record_of(container, oci, claim), ["labels", "spec"])
            log.info(
                "recorded a claim answered before a restart",
                extra={"sandbox": cid, "sandbox_id": claim.sandbox_id},
            )

    async def close(self) -> None:
        """Write the records not written yet and let them finish (bounded); what is left stays
        journalled."""
        for pending in list(self._pending.values()):
            self._start_record(pending)
        tasks = [p.task for p in self._pending.values() if p.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=SETTLE_SECONDS)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- the journal ----------------------------------------------------------------------------
    def _open(self) -> int:
        if self._fd is None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.directory / JOURNAL, flags, 0o600)
        return self._fd

    def _append(self, line: bytes) -> None:
        """One `write` of a whole line (appends of one write do not interleave)."""
        written = os.write(self._open(), line)
        if written != len(line):
            raise OSError(f"claim journal: short write ({written} of {len(line)} bytes)")

    def _done(self, container_id: str) -> None:
        try:
            if self._pending:
                self._append(json.dumps({"done": container_id}).encode() + b"\n")
            else:
                self._truncate()  # nothing in flight: nothing to replay
        except OSError as exc:
            # A replay would find the record already written and do nothing more.
            log.warning(
                "claim journal not updated", extra={"sandbox": container_id, "err": str(exc)}
            )

    def _truncate(self) -> None:
        os.ftruncate(self._open(), 0)


def unrecorded(directory: Path) -> dict[str, Claimed]:
    """The claims journalled in `directory` with no `done` after them, by container id."""
    try:
        data = (directory / JOURNAL).read_bytes()
    except FileNotFoundError:
        return {}
    claims: dict[str, Claimed] = {}
    for line in data.splitlines():
        try:
            entry = json.loads(line)
            if "claim" in entry:
                claim = Claimed.from_value(entry["claim"])
                claims[claim.container_id] = claim
            elif "done" in entry:
                claims.pop(str(entry["done"]), None)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # cut short: its writer died before it answered
    return claims
