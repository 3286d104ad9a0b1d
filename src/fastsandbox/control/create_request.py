"""What a create carries besides the sandbox: its options, the request hash idempotency compares,
the container id, and the request label recovery rebuilds a record from (kept apart from
`sandboxes.py`, which imports them all from here)."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from fastsandbox.api import labels
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
from fastsandbox.api.images import PullCredentials
from fastsandbox.api.models import ConsistencyMode, Sandbox, SandboxPool


class ReadCache(Protocol):
    """What a create reads before placement, from a watch cache (`ReplicaSync`). None means the
    cache cannot say (not listed yet): the store is asked."""

    def name_taken(self, namespace: str, name: str) -> bool | None: ...

    def pool(self, namespace: str, name: str) -> SandboxPool | None: ...


@dataclass(frozen=True, slots=True)
class CreateOptions:
    mode: ConsistencyMode = ConsistencyMode.FAST
    idempotency_key: str = ""
    # Hash of the request as the user sent it (ttl, not the expire time derived from it), so a
    # retried request matches its first attempt.
    request_hash: str = ""
    # time.perf_counter() when the request arrived; timings are measured from here.
    arrived: float = 0.0
    # time.monotonic() the caller stops waiting at (its gRPC deadline); None: no deadline.
    deadline: float | None = None
    # The registry credentials the request carried, for this create's agent call only.
    pull_credentials: PullCredentials | None = field(default=None, repr=False)
    # Done once the answer has left (the Fast-Path: its RPC finished). With
    # `SandboxService.store_after_reply` Fast mode stores the record after it, so the store's
    # work does not compete with the reply on its way out. None: store at once.
    replied: Awaitable[None] | None = field(default=None, repr=False)


def request_hash(canonical_json: str) -> str:
    return hashlib.sha256(canonical_json.encode()).hexdigest()[:32]


def new_sandbox_id(name: str) -> str:
    return f"{name[:50]}-{secrets.token_hex(4)}"


REQUEST_LABEL = labels.REQUEST_LABEL
# containerd refuses labels over 4096 bytes (key + value).
_MAX_LABEL = 4096 - len(REQUEST_LABEL)


def request_label(sb: Sandbox) -> list[agent_pb2.KeyValue]:
    """The record, without status, carried on the container as a label: if the server dies
    between the agent's create and the record's write (Fast mode), recovery rebuilds the record
    from it instead of leaving a running sandbox nobody knows about."""
    body = json.dumps(
        {
            "metadata": sb.metadata.model_dump(mode="json", by_alias=True, exclude_none=True),
            "spec": sb.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        },
        separators=(",", ":"),
    )
    if len(body) > _MAX_LABEL:
        return []
    return [agent_pb2.KeyValue(key=REQUEST_LABEL, value=body)]
