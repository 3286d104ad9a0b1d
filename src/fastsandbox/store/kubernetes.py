"""`KubernetesStore`: the `ObjectStore` on our CRDs through a real kube-apiserver.

The apiserver already has the semantics `store.base` describes: optimistic concurrency on
`metadata.resourceVersion` (a store-wide etcd revision), `generation` moving only with the spec
(the CRDs have a status subresource), finalizers holding deletion, no-op writes that do not write,
and watches that resume from a resourceVersion. So this backend translates rather than
re-implements; `tests/contract/test_store_contract.py` runs the same suite on it as on SQLite.

Where Kubernetes differs, and what this backend does about it:
- The apiserver assigns `metadata.uid` itself; a uid given to `create` is not kept.
- resourceVersions are etcd revisions shared with every other resource of the cluster: they
  increase strictly, but not by one per change of ours.
- `update` reads the stored object first and writes back the metadata our models do not carry
  (ownerReferences someone else set, ...): a PUT replaces all of metadata. The stored
  resourceVersion is the precondition when the caller gives none (last writer wins, retried on
  conflict). `update_status` needs no read: the status subresource ignores all but status.
- `watch(kind, "0")` lists every object (sorted by namespace and name) as ADDED, then watches
  from the list's resourceVersion: Kubernetes keeps no history from the beginning of time, and
  this is the state that replaying it would produce.
- A watch from a resourceVersion newer than the apiserver's is accepted by Kubernetes (it waits
  for it); we check against the current version first and raise `Conflict`, as the other
  backends do. One too old for the apiserver's watch cache arrives as `410 Gone` → `Conflict`.
- A watch reconnects by itself, from the last version it delivered, when the apiserver ends the
  stream (its request timeout) or is unreachable for a while (a restart: backoff up to 5 s);
  only what the apiserver refuses (410 Gone, 403, ...) ends it, with the translated error.
- The apiserver sends BOOKMARKs about once a minute, far too rarely to tell a watcher "nothing
  happened" at `bookmark_interval`. So when the stream is idle that long this store synthesizes
  a BOOKMARK carrying the last resourceVersion the watch delivered (or started from). That is
  always a valid resume point, though it can be older than the store-wide version when other
  kinds (or other resources of the cluster) changed meanwhile. The apiserver's own BOOKMARKs
  are passed on when they move the version forward.
- Events are core/v1 `Event`s about the object (`involvedObject` with its uid), listed with a
  field selector; those of an earlier object with the same name are told apart by uid, and are
  deleted when this store removes the object (Kubernetes' event TTL collects the rest). Unlike
  the embedded stores, recording one moves the store-wide resourceVersion (it is an etcd write),
  though it never shows up in a watch of our kinds.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx2
from lightkube import ALL_NS, AsyncClient

from fastsandbox._aio.to_the_end import to_the_end
from fastsandbox._kube import config
from fastsandbox._kube.errors import from_response, from_status, translate
from fastsandbox._kube.resources import (
    EVENT_COMPONENT,
    collection_path,
    event_from_manifest,
    event_manifest,
    event_repeats,
    event_time,
    from_manifest,
    kind_name,
    merge_event,
    object_path,
    resource_for,
    to_manifest,
)
from fastsandbox.api.models import KINDS, Event, Sandbox, SandboxPool
from fastsandbox.errors import (
    AlreadyExists,
    Conflict,
    FsbError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from fastsandbox.store import _rules as rules
from fastsandbox.store.base import (
    DEFAULT_EVENT_LIMIT,
    MAX_EVENTS_PER_OBJECT,
    EventType,
    Obj,
    ObjectStore,
    WatchEvent,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
_Kind = type[Sandbox] | type[SandboxPool]

# Watch reconnect backoff while the apiserver is unreachable (seconds).
_RECONNECT_FIRST = 0.1
_RECONNECT_MAX = 5.0
# How often an update with an empty resourceVersion (last writer wins) re-reads and retries.
_LAST_WRITER_ATTEMPTS = 5


class KubernetesStore:
    keeps_uid = False  # the apiserver assigns metadata.uid

    def __init__(self, client: AsyncClient, *, bookmark_interval: float = 10.0) -> None:
        """`client`: owned by the store from now on (closed by `close`).
        `bookmark_interval`: idle seconds before a watcher gets a BOOKMARK."""
        if bookmark_interval <= 0:
            raise InvalidArgument("bookmark_interval must be positive")
        self._client = client
        self._http = config.raw_http(client)
        self._bookmark_interval = bookmark_interval
        self._closed = False
        self._closing = asyncio.Event()
        self._instance = socket.gethostname()[:128] or EVENT_COMPONENT
        self._last_event_stamp = 0

    @classmethod
    async def open(
        cls, kubeconfig: Path | None = None, *, bookmark_interval: float = 10.0
    ) -> KubernetesStore:
        """A store on the cluster of `kubeconfig` (else `$KUBECONFIG`, else in-cluster)."""
        return cls(await config.make_client(kubeconfig), bookmark_interval=bookmark_interval)

    # -- reads -----------------------------------------------------------------------------
    async def get(self, kind: type[Obj], namespace: str, name: str) -> Obj:
        return from_manifest(kind, await self._get_raw(kind, namespace, name))

    async def _get_raw(self, kind: _Kind, namespace: str, name: str) -> Any:
        return await self._call(
            rules.describe(kind_name(kind), namespace, name),
            lambda: self._client.get(resource_for(kind), name, namespace=namespace),
        )

    async def list(
        self,
        kind: type[Obj],
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> builtins.list[Obj]:
        raws, _ = await self._list_raw(kind, namespace, labels)
        objects = []
        for raw in raws:
            try:
                objects.append(from_manifest(kind, raw))
            except InvalidArgument as exc:
                log.warning("skipping an object that does not fit the model: %s", exc)
        return objects

    async def _list_raw(
        self,
        kind: _Kind,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> tuple[builtins.list[Any], int]:
        """The manifests (ordered by namespace, then name) and the list's resourceVersion."""
        listing = self._client.list(
            resource_for(kind),
            namespace=ALL_NS if namespace is None else namespace,
            labels=dict(labels) if labels else None,
        )

        async def collect() -> builtins.list[Any]:
            return [item async for item in listing]

        raws = await self._call(f"{kind_name(kind)} list", collect)
        return raws, int(listing.resourceVersion)

    async def current_resource_version(self) -> str:
        # A one-item list is a quorum read of etcd: its resourceVersion is the store-wide one.
        listing = await self._request(
            "the current resourceVersion",
            "GET",
            collection_path(Sandbox, None),
            params={"limit": "1"},
        )
        version: str = listing["metadata"]["resourceVersion"]
        return version

    # -- writes ----------------------------------------------------------------------------
    async def create(self, obj: Obj) -> Obj:
        kind = type(obj)
        meta = obj.metadata
        body = to_manifest(obj)
        for key in (
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
        ):
            body["metadata"].pop(key, None)
        body.pop("status", None)  # ignored on create: the status subresource owns it
        raw = await self._call(
            rules.describe(kind_name(kind), meta.namespace, meta.name),
            lambda: self._client.create(resource_for(kind).from_dict(body)),
        )
        return from_manifest(kind, raw)

    async def update(self, obj: Obj) -> Obj:
        """Labels, annotations, finalizers and spec from `obj`; everything else in metadata as
        stored. The stored object is read first: a PUT replaces metadata, and what our models
        do not carry (ownerReferences set by someone else, ...) must survive our writes."""
        kind = type(obj)
        meta = obj.metadata
        what = rules.describe(kind_name(kind), meta.namespace, meta.name)
        wanted = to_manifest(obj)
        res = resource_for(kind)
        for attempt in range(_LAST_WRITER_ATTEMPTS):
            stored = dict(await self._get_raw(kind, meta.namespace, meta.name))
            stored_meta = dict(stored.get("metadata") or {})
            version = meta.resource_version or stored_meta.get("resourceVersion", "")
            if version != stored_meta.get("resourceVersion"):
                raise Conflict(
                    f"{what} was modified (resourceVersion {stored_meta.get('resourceVersion')}, "
                    f"you had {version}): read it again and retry"
                )
            # managedFields left out: the apiserver keeps them when an update has none.
            body_meta = {k: v for k, v in stored_meta.items() if k != "managedFields"}
            for key in ("labels", "annotations", "finalizers"):
                if key in wanted["metadata"]:
                    body_meta[key] = wanted["metadata"][key]
                else:
                    body_meta.pop(key, None)
            body = {
                "apiVersion": wanted["apiVersion"],
                "kind": wanted["kind"],
                "metadata": body_meta,
                "spec": wanted["spec"],
            }
            try:
                raw = await self._call(what, partial(self._client.replace, res.from_dict(body)))
            except Conflict:
                if meta.resource_version or attempt == _LAST_WRITER_ATTEMPTS - 1:
                    raise
                continue  # last writer wins: read again
            updated = from_manifest(kind, raw)
            if rules.is_gone(updated):
                await self._forget_events(updated)
            return updated
        raise AssertionError("unreachable")

    async def update_status(self, obj: Obj) -> Obj:
        """Status only: the status subresource ignores everything else in the body."""
        kind = type(obj)
        meta = obj.metadata
        what = rules.describe(kind_name(kind), meta.namespace, meta.name)
        manifest = to_manifest(obj)
        body: dict[str, Any] = {
            "apiVersion": manifest["apiVersion"],
            "kind": manifest["kind"],
            "metadata": {"name": meta.name, "namespace": meta.namespace},
        }
        if "status" in manifest:
            body["status"] = manifest["status"]
        status = resource_for(kind).Status
        for attempt in range(_LAST_WRITER_ATTEMPTS):
            version = meta.resource_version
            if not version:
                current = await self.get(kind, meta.namespace, meta.name)
                version = current.metadata.resource_version
            body["metadata"]["resourceVersion"] = version
            try:
                raw = await self._call(
                    what, lambda: self._client.replace(status.from_dict(body), meta.name)
                )
            except Conflict:
                if meta.resource_version or attempt == _LAST_WRITER_ATTEMPTS - 1:
                    raise
                continue  # last writer wins: read again
            return from_manifest(kind, raw)
        raise AssertionError("unreachable")

    async def delete(self, kind: type[Obj], namespace: str, name: str) -> Obj | None:
        what = rules.describe(kind_name(kind), namespace, name)
        answer = await self._request(what, "DELETE", object_path(kind, namespace, name))
        if answer.get("kind") == "Status":
            # Removed at once (no finalizers): the answer is a Status naming the uid it had.
            uid = (answer.get("details") or {}).get("uid", "")
            await self._forget_events_of(kind_name(kind), namespace, name, uid)
            return None
        return from_manifest(kind, answer)  # held by finalizers, deletionTimestamp set

    # -- watch -----------------------------------------------------------------------------
    async def watch(
        self, kind: type[Sandbox] | type[SandboxPool], since: str = "0"
    ) -> AsyncGenerator[WatchEvent, None]:
        self._check_open()
        start = rules.parse_resource_version(since)
        closing = asyncio.ensure_future(self._closing.wait())
        stream: AsyncGenerator[dict[str, Any], None] | None = None
        pending: asyncio.Future[dict[str, Any]] | None = None
        try:
            if start == 0:
                raws, last = await self._unless_closed(closing, self._list_raw(kind))
                for raw_obj in raws:
                    listed = _decode_or_skip(kind, raw_obj)
                    if listed is not None:
                        yield WatchEvent(EventType.ADDED, listed, listed.metadata.resource_version)
            else:
                current = int(await self._unless_closed(closing, self.current_resource_version()))
                if start > current:
                    raise Conflict(
                        f"resourceVersion {start} is newer than the store's ({current}): "
                        "list again and watch from there"
                    )
                last = start
            stream = self._stream(kind, last)
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(_next(stream))
                waiters: set[asyncio.Future[Any]] = {pending, closing}
                done, _ = await asyncio.wait(
                    waiters,
                    timeout=self._bookmark_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if closing in done:
                    raise Unavailable("the object store was closed")
                if pending not in done:
                    # Idle: nothing after `last` has arrived, so it is a valid resume point.
                    yield WatchEvent(EventType.BOOKMARK, None, str(last))
                    continue
                finished, pending = pending, None
                raw = finished.result()
                version = int(raw["object"]["metadata"]["resourceVersion"])
                if raw["type"] == EventType.BOOKMARK:
                    if version > last:
                        last = version
                        yield WatchEvent(EventType.BOOKMARK, None, str(last))
                    continue
                obj = _decode_or_skip(kind, raw["object"])
                if obj is None:
                    continue
                last = max(last, version)
                yield WatchEvent(EventType(raw["type"]), obj, str(version))
        finally:
            closing.cancel()
            if pending is not None:
                if not pending.done():
                    pending.cancel()
                    await asyncio.wait({pending})
                if not pending.cancelled():
                    pending.exception()  # retrieved: the watch is over either way
            if stream is not None:
                await stream.aclose()

    async def _stream(self, kind: _Kind, since: int) -> AsyncGenerator[dict[str, Any], None]:
        """Raw watch events of `kind` after `since`.

        Reconnects from the last version seen whenever the stream ends: at the apiserver's
        request timeout, and with backoff while the apiserver is unreachable or overloaded
        (a restart must not end every reconciler's watch). What the apiserver refuses
        (410 Gone, 403, ...) ends the watch with the translated error.
        """
        what = f"the {kind_name(kind)} watch"
        version = since
        backoff = _RECONNECT_FIRST
        while True:
            params = {
                "watch": "true",
                "allowWatchBookmarks": "true",
                "resourceVersion": str(version),
            }
            try:
                async with self._http.stream(
                    "GET",
                    collection_path(kind, None),
                    params=params,
                    timeout=httpx2.Timeout(config.REQUEST_TIMEOUT, read=None),
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise from_response(response, what)
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event.get("type") == "ERROR":
                            raise from_status(event.get("object") or {}, what)
                        version = int(event["object"]["metadata"]["resourceVersion"])
                        backoff = _RECONNECT_FIRST
                        yield event
                continue  # the apiserver ended the request: resume where it stopped
            except Unavailable as exc:
                failure: Exception = exc  # 429/5xx: the apiserver is there but cannot serve
            except FsbError:
                raise
            except (httpx2.TransportError, ValueError) as exc:
                failure = exc  # connection refused or cut, a truncated line
            except Exception as exc:
                raise translate(exc, what) from exc
            if self._closed:
                raise Unavailable("the object store was closed") from failure
            log.warning(
                "watch interrupted; reconnecting",
                extra={"kind": kind_name(kind), "err": str(failure), "retry_in": backoff},
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RECONNECT_MAX)

    async def _unless_closed(self, closing: asyncio.Future[Any], step: Awaitable[T]) -> T:
        """`step`'s result, or `Unavailable` as soon as the store is closed (step cancelled)."""
        task = asyncio.ensure_future(step)
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if task.cancelled():
            raise Unavailable("the object store was closed")
        return task.result()

    # -- events ----------------------------------------------------------------------------
    # Plain dicts over the raw client: see `resources.micro_time` for why not lightkube's model.
    async def record_event(self, event: Event) -> None:
        kind = _event_kind(event.kind)
        self._check_open()
        try:
            current = _decode(kind, await self._get_raw(kind, event.namespace, event.name))
        except NotFound:
            return
        uid = current.metadata.uid
        if event.uid and event.uid != uid:
            return  # an event of an earlier object with this name
        what = f"an event of {rules.describe(event.kind, event.namespace, event.name)}"
        collection = f"/api/v1/namespaces/{event.namespace}/events"
        for _ in range(3):
            existing = await self._object_events(event.kind, event.namespace, event.name, uid)
            latest = existing[-1] if existing else None
            try:
                if latest is not None and event_repeats(latest, event):
                    merged = merge_event(latest, event)
                    path = f"{collection}/{merged['metadata']['name']}"
                    await self._request(what, "PUT", path, body=merged)
                    return
                body = event_manifest(
                    event, current, name=self._event_name(event.name), instance=self._instance
                )
                await self._request(what, "POST", collection, body=body)
            except (Conflict, NotFound, AlreadyExists):
                continue  # someone else recorded or trimmed meanwhile: look again
            for old in existing[: len(existing) + 1 - MAX_EVENTS_PER_OBJECT]:
                with contextlib.suppress(NotFound):
                    await self._request(what, "DELETE", f"{collection}/{old['metadata']['name']}")
            return
        log.info("dropped an event after repeated conflicts", extra={"event": event.reason})

    async def list_events(
        self, kind: str, namespace: str, name: str, limit: int = DEFAULT_EVENT_LIMIT
    ) -> builtins.list[Event]:
        model = _event_kind(kind)
        self._check_open()
        if limit < 1:
            raise InvalidArgument(f"limit must be at least 1, not {limit}")
        try:
            current = _decode(model, await self._get_raw(model, namespace, name))
        except NotFound:
            return []
        found = await self._object_events(kind, namespace, name, current.metadata.uid)
        return [event_from_manifest(e) for e in found[-limit:]]

    async def _object_events(
        self, kind: str, namespace: str, name: str, uid: str
    ) -> builtins.list[dict[str, Any]]:
        """This store's events of the object with `uid`, oldest first."""
        selector = ",".join(
            f"{key}={value}"
            for key, value in (
                ("involvedObject.kind", kind),
                ("involvedObject.name", name),
                ("involvedObject.uid", uid),
                ("reportingComponent", EVENT_COMPONENT),
            )
        )
        listing = await self._request(
            f"the events of {kind} {namespace}/{name}",
            "GET",
            f"/api/v1/namespaces/{namespace}/events",
            params={"fieldSelector": selector},
        )
        found: builtins.list[dict[str, Any]] = listing.get("items") or []
        return sorted(found, key=lambda e: (event_time(e), e["metadata"]["name"]))

    def _event_name(self, object_name: str) -> str:
        # Names sort in creation order: the tie-break between events of the same time.
        stamp = max(time.time_ns(), self._last_event_stamp + 1)
        self._last_event_stamp = stamp
        return f"{object_name}.{stamp:016x}"

    async def _forget_events(self, obj: Sandbox | SandboxPool) -> None:
        meta = obj.metadata
        await self._forget_events_of(obj.kind, meta.namespace, meta.name, meta.uid)

    async def _forget_events_of(self, kind: str, namespace: str, name: str, uid: str) -> None:
        """Best effort: the object is gone, so are its events (they are invisible anyway, being
        of another uid than any later object with this name)."""
        if not uid:
            return
        selector = f"involvedObject.uid={uid},reportingComponent={EVENT_COMPONENT}"
        try:
            await self._request(
                f"the events of {kind} {namespace}/{name}",
                "DELETE",
                f"/api/v1/namespaces/{namespace}/events",
                params={"fieldSelector": selector},
            )
        except FsbError as exc:
            log.info("could not delete events of a removed object: %s", exc)

    # -- plumbing --------------------------------------------------------------------------
    async def _request(
        self,
        what: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One request over the raw client; a non-2xx answer raises the translated error."""
        response = await self._call(
            what, lambda: self._http.request(method, path, params=params, json=body)
        )
        if not response.is_success:
            raise from_response(response, what)
        answer: dict[str, Any] = response.json()
        return answer

    async def _call(self, what: str, request: Callable[[], Awaitable[T]]) -> T:
        """Run one apiserver request, translating its failures (one seam: `_kube.errors`).

        Once sent, a request runs to its end even if the caller is cancelled (bounded by the
        client's timeout): a cancelled write has then either happened or not, as on the other
        backends, and httpx never abandons a connection half-way through an exchange.
        """
        self._check_open()
        return await to_the_end(self._translated(what, request))

    async def _translated(self, what: str, request: Callable[[], Awaitable[T]]) -> T:
        try:
            return await request()
        except FsbError:
            raise
        except Exception as exc:
            if self._closed:
                raise Unavailable("the object store is closed") from exc
            raise translate(exc, what) from exc

    # -- lifecycle -------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()  # every watch ends with Unavailable
        await self._http.aclose()
        await self._client.close()

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the object store is closed")


async def _next(stream: AsyncIterator[T]) -> T:
    return await anext(stream)


def _decode(kind: _Kind, raw: Mapping[str, Any]) -> Sandbox | SandboxPool:
    if kind is Sandbox:
        return from_manifest(Sandbox, raw)
    return from_manifest(SandboxPool, raw)


def _decode_or_skip(kind: _Kind, raw: Mapping[str, Any]) -> Sandbox | SandboxPool | None:
    """One object of a list or watch; one that does not fit the model is logged and skipped,
    so it cannot stop every reconciler that lists or watches its kind."""
    try:
        return _decode(kind, raw)
    except InvalidArgument as exc:
        log.warning("skipping an object that does not fit the model: %s", exc)
        return None


def _event_kind(kind: str) -> _Kind:
    try:
        return KINDS[kind]
    except KeyError:
        raise InvalidArgument(f"events are kept for {' and '.join(KINDS)}, not {kind!r}") from None


if TYPE_CHECKING:  # mypy proves the Protocol is implemented

    def _implements(store: KubernetesStore) -> ObjectStore:
        return store
