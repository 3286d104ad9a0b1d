"""The write rules of `ObjectStore`, as pure functions every backend shares.

Why here and not in each backend: the semantics in `base.py` (what `create` assigns, when
`generation` moves, what `update` may touch, when an object is really gone) must be identical on
every backend, and pure functions over models are testable without any storage at all. Backends
only decide *where* bytes go; these functions decide *which* bytes.

Every function returns a fresh object the caller owns: stores hand out copies because callers
mutate what they get.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from fastsandbox.api.models import Sandbox, SandboxPool, now
from fastsandbox.errors import Conflict, InvalidArgument
from fastsandbox.store.base import Obj

_KIND_NAMES: dict[type[Sandbox] | type[SandboxPool], str] = {
    Sandbox: "Sandbox",
    SandboxPool: "SandboxPool",
}


def kind_name(kind: type[Sandbox] | type[SandboxPool]) -> str:
    """The stored kind of a model class; the class is the only source of it."""
    try:
        return _KIND_NAMES[kind]
    except KeyError:
        raise InvalidArgument(f"the store keeps Sandbox and SandboxPool, not {kind!r}") from None


def describe(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}"


def parse_resource_version(value: str) -> int:
    """`"0"`/`""` → 0; anything that is not a non-negative integer is a caller error."""
    if value == "":
        return 0
    try:
        parsed = int(value)
    except ValueError:
        raise InvalidArgument(f"resourceVersion {value!r} is not a number") from None
    if parsed < 0:
        raise InvalidArgument(f"resourceVersion {value!r} is negative")
    return parsed


def encode(obj: Sandbox | SandboxPool) -> str:
    """The stored body: `model_dump(mode="json", by_alias=True)` as JSON text."""
    return obj.model_dump_json(by_alias=True)


def decode(kind: type[Obj], body: str) -> Obj:
    return kind.model_validate_json(body)


def labels_match(obj: Sandbox | SandboxPool, labels: Mapping[str, str] | None) -> bool:
    if not labels:
        return True
    have = obj.metadata.labels
    return all(have.get(key) == value for key, value in labels.items())


def check_version(current: Sandbox | SandboxPool, given: Sandbox | SandboxPool) -> None:
    """Optimistic concurrency: a non-empty `resourceVersion` must be the stored one."""
    expected = given.metadata.resource_version
    if expected and expected != current.metadata.resource_version:
        meta = current.metadata
        raise Conflict(
            f"{describe(current.kind, meta.namespace, meta.name)} was modified "
            f"(resourceVersion {meta.resource_version}, you had {expected}): "
            "read it again and retry"
        )


def for_create(obj: Obj, resource_version: int) -> Obj:
    fresh = obj.model_copy(deep=True)
    meta = fresh.metadata
    meta.uid = meta.uid or str(uuid.uuid4())
    meta.creation_timestamp = now()
    meta.deletion_timestamp = None
    meta.generation = 1
    meta.resource_version = str(resource_version)
    return fresh


def for_update(current: Obj, given: Obj) -> Obj | None:
    """`current` with the given labels, annotations, finalizers and spec; None if nothing changes.

    Identity and bookkeeping (uid, creation/deletion timestamps, generation) stay the store's;
    the given status is ignored.
    """
    check_version(current, given)
    new = current.model_copy(deep=True)
    meta, wanted = new.metadata, given.metadata
    meta.labels = dict(wanted.labels)
    meta.annotations = dict(wanted.annotations)
    meta.finalizers = list(wanted.finalizers)
    spec = given.spec.model_copy(deep=True)
    if spec.model_dump() != current.spec.model_dump():
        meta.generation += 1
    new.spec = spec
    return None if _same(new, current) else new


def for_status(current: Obj, given: Obj) -> Obj | None:
    """`current` with the given status; None if nothing changes."""
    check_version(current, given)
    new = current.model_copy(deep=True)
    new.status = given.status.model_copy(deep=True)
    return None if _same(new, current) else new


def for_delete(current: Obj) -> Obj | None:
    """`current` marked for deletion; None when already marked (the timestamp is set once)."""
    if current.metadata.deletion_timestamp is not None:
        return None
    new = current.model_copy(deep=True)
    new.metadata.deletion_timestamp = now()
    return new


def is_gone(obj: Sandbox | SandboxPool) -> bool:
    """Marked for deletion and nothing left holding it: the store removes it."""
    return obj.metadata.deletion_timestamp is not None and not obj.metadata.finalizers


def _same(a: Sandbox | SandboxPool, b: Sandbox | SandboxPool) -> bool:
    # A write that changes nothing must not produce a resourceVersion or an event: a reconciler
    # that writes what it read would otherwise wake itself up forever.
    return a.model_dump() == b.model_dump()
