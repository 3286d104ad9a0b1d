"""Our CRDs as lightkube generic resources, and the one translation models ⇄ manifests
(including our `Event` ⇄ core/v1 `Event`).

Why one translation: the store, the fleet and the controller all read and write `Sandbox` and
`SandboxPool` objects through the apiserver, and the apiserver adds metadata our models do not
carry (managedFields, ownerReferences, deletionGracePeriodSeconds, ...). `from_manifest` keeps
what `ObjectMeta` knows and drops the rest; `to_manifest` writes the wire form the CRD schema
(generated from the same models by `fastsandbox.api.crds`) validates.

Status is written in its minimal form (fields equal to their defaults left out, no `status` at all
when everything is default), because that is the form the apiserver stores: it ignores status on
create, so a fresh object has none, and it fills in the schema's defaults itself. Writing the
minimal form makes a write of what was read a true no-op (same resourceVersion, no event).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from lightkube.generic_resource import GenericNamespacedResource, create_namespaced_resource
from pydantic import ValidationError

from fastsandbox.api.crds import GROUP, PLURALS, VERSION
from fastsandbox.api.labels import API_VERSION
from fastsandbox.api.models import (
    Event,
    ObjectMeta,
    Sandbox,
    SandboxPool,
    describe_validation_error,
    parse_rfc3339,
    to_wire,
)
from fastsandbox.errors import InvalidArgument

Model = TypeVar("Model", Sandbox, SandboxPool)

SandboxResource = create_namespaced_resource(GROUP, VERSION, "Sandbox", PLURALS["Sandbox"])
SandboxPoolResource = create_namespaced_resource(
    GROUP, VERSION, "SandboxPool", PLURALS["SandboxPool"]
)

_RESOURCES: dict[type[Sandbox] | type[SandboxPool], type[GenericNamespacedResource]] = {
    Sandbox: SandboxResource,
    SandboxPool: SandboxPoolResource,
}
# Metadata keys our models carry, in their wire spelling.
_META_KEYS = frozenset(field.alias or name for name, field in ObjectMeta.model_fields.items())


def resource_for(kind: type[Sandbox] | type[SandboxPool]) -> type[GenericNamespacedResource]:
    try:
        return _RESOURCES[kind]
    except KeyError:
        raise InvalidArgument(f"no Kubernetes resource for {kind!r}") from None


def kind_name(kind: type[Sandbox] | type[SandboxPool]) -> str:
    return "Sandbox" if kind is Sandbox else "SandboxPool"


def collection_path(kind: type[Sandbox] | type[SandboxPool], namespace: str | None) -> str:
    """The REST path of `kind` in `namespace`, or in every namespace (None)."""
    plural = PLURALS[kind_name(kind)]
    if namespace is None:
        return f"/apis/{GROUP}/{VERSION}/{plural}"
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"


def object_path(kind: type[Sandbox] | type[SandboxPool], namespace: str, name: str) -> str:
    return f"{collection_path(kind, namespace)}/{name}"


def to_manifest(obj: Sandbox | SandboxPool) -> dict[str, Any]:
    """The object as the apiserver should get it: camelCase, empty bookkeeping left out, status
    minimal (see the module docstring)."""
    data = to_wire(obj)
    meta: dict[str, Any] = data["metadata"]
    for key, empty in (("uid", ""), ("resourceVersion", ""), ("generation", 0)):
        if meta.get(key) == empty:
            del meta[key]
    for key in ("labels", "annotations", "finalizers"):
        if not meta.get(key):
            meta.pop(key, None)
    status = obj.status.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    if status:
        data["status"] = status
    else:
        data.pop("status", None)
    return data


def from_manifest(kind: type[Model], data: Mapping[str, Any]) -> Model:
    """A manifest read from the apiserver → our model; metadata we do not model is dropped.

    Raises `InvalidArgument` naming the fields when the object does not fit the model (written
    by something that bypassed the CRD's validation, or by a newer version of us).
    """
    raw_meta = data.get("metadata") or {}
    body: dict[str, Any] = {
        "metadata": {key: value for key, value in raw_meta.items() if key in _META_KEYS},
    }
    for part in ("spec", "status"):
        if data.get(part) is not None:
            body[part] = data[part]
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        name = f"{raw_meta.get('namespace', '')}/{raw_meta.get('name', '')}"
        raise InvalidArgument(
            f"{kind_name(kind)} {name} does not fit the model: {describe_validation_error(exc)}"
        ) from exc


# -- events ----------------------------------------------------------------------------------
EVENT_COMPONENT = "fastsandbox"


def micro_time(value: datetime) -> str:
    """A `metav1.MicroTime`: UTC with exactly six fractional digits, which the apiserver
    requires (lightkube's encoder drops the fraction of whole seconds, so events are built as
    plain dicts here)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_manifest(
    event: Event, obj: Sandbox | SandboxPool, *, name: str, instance: str
) -> dict[str, Any]:
    """A core/v1 Event about `obj` (its uid and resourceVersion in `involvedObject`)."""
    stamp = micro_time(event.timestamp)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": event.namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": event.kind,
            "namespace": event.namespace,
            "name": event.name,
            "uid": obj.metadata.uid,
            "resourceVersion": obj.metadata.resource_version,
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message,
        "count": event.count,
        # eventTime keeps microseconds; first/lastTimestamp are whole seconds (what kubectl
        # shows). With eventTime set the apiserver wants the reporting fields and an action.
        "eventTime": stamp,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "action": event.reason,
        "reportingComponent": EVENT_COMPONENT,
        "reportingInstance": instance,
        "source": {"component": EVENT_COMPONENT},
    }


def event_time(manifest: Mapping[str, Any]) -> datetime:
    """The latest occurrence: the series' last observation, else the event's own time."""
    series = manifest.get("series") or {}
    for value in (
        series.get("lastObservedTime"),
        manifest.get("eventTime"),
        manifest.get("lastTimestamp"),
        manifest.get("firstTimestamp"),
    ):
        if value:
            return parse_rfc3339(value).astimezone(UTC)
    return datetime.min.replace(tzinfo=UTC)


def event_repeats(manifest: Mapping[str, Any], event: Event) -> bool:
    """Whether `event` is the same happening again as the recorded `manifest`."""
    return (manifest.get("type"), manifest.get("reason"), manifest.get("message") or "") == (
        event.type,
        event.reason,
        event.message,
    )


def merge_event(manifest: Mapping[str, Any], event: Event) -> dict[str, Any]:
    """`manifest` counting `event` as a repeat: count grows, the latest time moves."""
    count = int(manifest.get("count") or 1) + event.count
    stamp = micro_time(event.timestamp)
    return {
        **manifest,
        "count": count,
        "lastTimestamp": stamp,
        "series": {"count": count, "lastObservedTime": stamp},
    }


def event_from_manifest(manifest: Mapping[str, Any]) -> Event:
    ref = manifest.get("involvedObject") or {}
    return Event.model_validate(
        {
            "kind": ref.get("kind", ""),
            "namespace": ref.get("namespace", ""),
            "name": ref.get("name", ""),
            "uid": ref.get("uid", ""),
            "type": manifest.get("type") or "Normal",
            "reason": manifest.get("reason") or "",
            "message": manifest.get("message") or "",
            "timestamp": event_time(manifest),
            "count": manifest.get("count") or 1,
        }
    )
