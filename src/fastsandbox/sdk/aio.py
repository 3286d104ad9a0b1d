"""`AsyncClient`: the Fast-Path API over `grpc.aio`, the only place the SDK does network I/O.

All SDK logic is written here once, async; `Client` (sync.py) only runs these coroutines on a
private event loop. Requests are built and errors translated by `_core`, so this module is just
"send it, with the token, and translate whatever goes wrong".
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncGenerator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

import grpc

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc
from fastsandbox.errors import Conflict
from fastsandbox.sdk import _channels, _core, _resolve
from fastsandbox.sdk._core import CreateOptions, CreateResult, PoolOptions
from fastsandbox.sdk._logs import LogRecord, Since, logs_request, record_from_wire

if TYPE_CHECKING:
    from fastsandbox.api._proto.fastsandbox.v1.fastpath_pb2_grpc import FastPathAsyncStub
    from fastsandbox.api.models import Event, Sandbox, SandboxPool

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# A list of a few thousand sandboxes is several MB of JSON; grpc's default cap is 4 MB.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]


class AsyncClient:
    """Talks to `fsb server`. Use as `async with AsyncClient() as client:` or call `close()`.

    `endpoint`, `token` and `namespace` default to `FSB_ENDPOINT` / `FSB_TOKEN` / `FSB_NAMESPACE`,
    then `~/.config/fastsandbox/config.yaml`, then what the server on this machine wrote into
    its data dir (address, token file, CA), then `settings.DEFAULT_ENDPOINT` and `default`.
    `token_file` (or `FSB_TOKEN_FILE`) names a file holding the token. The connection is TLS,
    trusting `ca_file` (`FSB_CA_FILE`), else the local server's CA, else the system's roots;
    `insecure=True` (`FSB_INSECURE=1`) is plaintext, to a loopback address only. `timeout`
    (seconds) bounds each unary call; None waits. Clients of one event loop to one endpoint
    share a connection, kept open a while after the last of them closes (`_channels`).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | None = None,
        namespace: str | None = None,
        *,
        timeout: float | None = None,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        insecure: bool | None = None,
    ) -> None:
        self._config = _resolve.resolve(
            endpoint, token, namespace, token_file=token_file, ca_file=ca_file, insecure=insecure
        )
        self._timeout = timeout
        self._channel: _channels.Lease | None = None
        self._stub: FastPathAsyncStub | None = None
        # How long the shared channel stays open once no client uses it; the sync `Client`
        # sets 0 (its loop is its own and ends with it).
        self._linger = _channels.LINGER_SECONDS

    @property
    def endpoint(self) -> str:
        return self._config.endpoint

    @property
    def namespace(self) -> str:
        return self._config.namespace

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            lease, self._channel, self._stub = self._channel, None, None
            await _channels.release(lease, self._linger)

    def _fastpath(self) -> FastPathAsyncStub:
        # Taken on first use, inside the loop that will drive it (the sync client's loop
        # lives in another thread than the one constructing the client).
        if self._stub is None:
            self._channel = _channels.acquire(
                self._config.channel_key, lambda: self._config.channel(_CHANNEL_OPTIONS)
            )
            self._stub = fastpath_pb2_grpc.FastPathStub(self._channel.channel)
        return self._stub

    async def _unary(self, method: Any, request: Req, *, timeout: float | None = None) -> Any:
        metadata = self._config.metadata()
        try:
            return await method(request, metadata=metadata, timeout=timeout or self._timeout)
        except grpc.RpcError as err:
            raise _core.translate(err, self._config.endpoint) from None

    def _ns(self, namespace: str | None) -> str:
        return namespace or self._config.namespace

    def _rpc(self) -> tuple[FastPathAsyncStub, tuple[tuple[str, str], ...]]:
        """The stub and call metadata, for the SDK's streaming modules (commands, files)."""
        return self._fastpath(), self._config.metadata()

    def _translate(self, err: grpc.RpcError) -> Exception:
        return _core.translate(err, self._config.endpoint)

    async def renew_lease(self, name: str, *, namespace: str | None = None) -> str:
        """Extend a leased sandbox's life by its lease; answers the new lapse time (RFC 3339)."""
        request = fastpath_pb2.RenewLeaseRequest(namespace=self._ns(namespace), name=name)
        reply: fastpath_pb2.RenewLeaseReply = await self._unary(
            self._fastpath().RenewLease, request
        )
        return reply.lease_expire_time

    # ------------------------------------------------------------------ tenant tokens (admin)

    async def create_token(
        self, namespace: str, *, ttl: int | timedelta | None = None
    ) -> tuple[_core.TokenInfo, str]:
        """A new token that may act only in `namespace`: (its record, the secret). The secret
        is shown this once; the server keeps only its hash."""
        request = fastpath_pb2.CreateTokenRequest(
            namespace=namespace, ttl_seconds=_core.ttl_seconds(ttl)
        )
        reply: fastpath_pb2.CreateTokenReply = await self._unary(
            self._fastpath().CreateToken, request
        )
        return _core.token_info(reply.info), reply.token

    async def list_tokens(self) -> builtins.list[_core.TokenInfo]:
        reply: fastpath_pb2.ListTokensReply = await self._unary(
            self._fastpath().ListTokens, fastpath_pb2.ListTokensRequest()
        )
        return [_core.token_info(t) for t in reply.tokens]

    async def revoke_token(self, token_id: str) -> None:
        await self._unary(
            self._fastpath().RevokeToken, fastpath_pb2.RevokeTokenRequest(id=token_id)
        )

    # ------------------------------------------------------------------ sandboxes

    async def create(self, name: str, image: str, **options: Unpack[CreateOptions]) -> CreateResult:
        """Start a sandbox and answer once its container runs (see `CreateOptions`)."""
        request = _core.create_request(self._ns(options.get("namespace")), name, image, options)
        reply: fastpath_pb2.CreateResponse = await self._unary(self._fastpath().Create, request)
        return _core.create_result(reply)

    async def get_raw(self, name: str, *, namespace: str | None = None) -> dict[str, Any]:
        """The sandbox as the server sent it (camelCase dict), without model parsing."""
        ref = fastpath_pb2.ObjectRef(namespace=self._ns(namespace), name=name)
        reply: fastpath_pb2.ObjectReply = await self._unary(self._fastpath().Get, ref)
        return _core.parse_wire(reply.object_json)

    async def get(self, name: str, *, namespace: str | None = None) -> Sandbox:
        return _core.sandbox_from_wire(await self.get_raw(name, namespace=namespace))

    async def list_raw(
        self,
        *,
        namespace: str | None = None,
        all_namespaces: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        ns = "" if all_namespaces else self._ns(namespace)
        reply: fastpath_pb2.ListReply = await self._unary(
            self._fastpath().List, _core.list_request(ns, labels)
        )
        return [_core.parse_wire(text) for text in reply.objects_json]

    async def list(
        self,
        *,
        namespace: str | None = None,
        all_namespaces: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> list[Sandbox]:
        raw = await self.list_raw(namespace=namespace, all_namespaces=all_namespaces, labels=labels)
        return [_core.sandbox_from_wire(item) for item in raw]

    async def delete(self, name: str, *, wait: bool = False, namespace: str | None = None) -> str:
        """Delete; returns the phase after the call (`Deleted` once the record is gone).

        With `wait`, answers only after the agent removed the container and the record is gone.
        """
        request = fastpath_pb2.DeleteRequest(namespace=self._ns(namespace), name=name, wait=wait)
        reply: fastpath_pb2.DeleteReply = await self._unary(self._fastpath().Delete, request)
        return reply.phase

    async def update(
        self,
        name: str,
        *,
        ttl: int | timedelta | None = None,
        expire_time: datetime | str | None = None,
        no_expiry: bool = False,
        labels: Mapping[str, str | None] | None = None,
        failure_policy: str | None = None,
        recovery_timeout: int | None = None,
        namespace: str | None = None,
    ) -> Sandbox:
        """Change a sandbox's expiry, labels, failure policy or recovery timeout.

        At most one of `ttl` (seconds from now), `expire_time` and `no_expiry`. `labels` are
        merged into the existing ones; a key mapped to None is removed. Returns the stored object.
        """
        request = _core.update_request(
            self._ns(namespace),
            name,
            ttl=ttl,
            expire_time=expire_time,
            no_expiry=no_expiry,
            labels=labels,
            failure_policy=failure_policy,
            recovery_timeout=recovery_timeout,
        )
        reply: fastpath_pb2.ObjectReply = await self._unary(self._fastpath().Update, request)
        return _core.sandbox_from_wire(_core.parse_wire(reply.object_json))

    async def reset(self, name: str, *, namespace: str | None = None) -> Sandbox:
        """Recreate the sandbox's container from the same spec with a fresh rootfs.

        Sets `spec.resetRevision` to a new value and returns at once; the new container runs when
        `status.observedResetRevision` equals it.
        """
        ref = fastpath_pb2.ObjectRef(namespace=self._ns(namespace), name=name)
        reply: fastpath_pb2.ObjectReply = await self._unary(self._fastpath().Reset, ref)
        return _core.sandbox_from_wire(_core.parse_wire(reply.object_json))

    async def events_raw(
        self, name: str, *, kind: str = "Sandbox", limit: int = 0, namespace: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        """The object's recent events as the server sent them (camelCase dicts), oldest first."""
        request = _core.events_request(self._ns(namespace), name, kind=kind, limit=limit)
        reply: fastpath_pb2.EventsReply = await self._unary(self._fastpath().ListEvents, request)
        return [_core.parse_wire(text) for text in reply.events_json]

    async def events(
        self, name: str, *, kind: str = "Sandbox", limit: int = 0, namespace: str | None = None
    ) -> builtins.list[Event]:
        """What happened to a sandbox (or, with `kind="SandboxPool"`, a pool), oldest first:
        Scheduled, Started, Exited, Expired, Reset, AgentLost, Rescheduled, ... The most recent
        `limit` (0: the server's default, 50); `NotFound` when the object does not exist."""
        raw = await self.events_raw(name, kind=kind, limit=limit, namespace=namespace)
        return [_core.event_from_wire(item) for item in raw]

    async def logs(
        self,
        name: str,
        *,
        follow: bool = False,
        namespace: str | None = None,
        tail: int = 0,
        since: Since | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The sandbox's stdout/stderr as raw chunks; with `follow`, until the sandbox ends.
        `tail`: only the last N lines (0 = all); `since`: only what was written since then.
        `log_records` keeps the two streams apart."""
        records = self.log_records(name, follow=follow, namespace=namespace, tail=tail, since=since)
        try:
            async for record in records:
                yield record.data
        finally:
            await records.aclose()

    async def log_records(
        self,
        name: str,
        *,
        follow: bool = False,
        namespace: str | None = None,
        tail: int = 0,
        since: Since | None = None,
    ) -> AsyncGenerator[LogRecord, None]:
        """Like `logs`, as records: which stream (stdout or stderr), the bytes, and when the
        sandbox wrote them."""
        request = logs_request(self._ns(namespace), name, follow=follow, tail=tail, since=since)
        call = self._fastpath().Logs(request, metadata=self._config.metadata())
        try:
            async for chunk in call:
                yield record_from_wire(chunk)
        except grpc.RpcError as err:
            raise _core.translate(err, self._config.endpoint) from None
        finally:
            call.cancel()

    # ------------------------------------------------------------------ pools

    async def create_pool(self, name: str, **options: Unpack[PoolOptions]) -> SandboxPool:
        request = _core.pool_request(self._ns(options.get("namespace")), name, options)
        reply: fastpath_pb2.ObjectReply = await self._unary(self._fastpath().CreatePool, request)
        return _core.pool_from_wire(_core.parse_wire(reply.object_json))

    async def create_pool_object(
        self, pool: SandboxPool | Mapping[str, Any], *, namespace: str | None = None
    ) -> SandboxPool:
        """Create a pool from a whole SandboxPool (model or camelCase dict, e.g. from YAML)."""
        request = _core.pool_object_request(pool, self._ns(namespace))
        reply: fastpath_pb2.ObjectReply = await self._unary(self._fastpath().CreatePool, request)
        return _core.pool_from_wire(_core.parse_wire(reply.object_json))

    async def update_pool(
        self, pool: SandboxPool | Mapping[str, Any], *, namespace: str | None = None
    ) -> SandboxPool:
        """Replace a pool's spec. With `metadata.resourceVersion` set, raises `Conflict` when
        the pool changed since it was read; `spec.runtime` cannot change."""
        request = _core.pool_object_request(pool, self._ns(namespace))
        reply: fastpath_pb2.ObjectReply = await self._unary(self._fastpath().UpdatePool, request)
        return _core.pool_from_wire(_core.parse_wire(reply.object_json))

    async def scale_pool(
        self,
        name: str,
        *,
        pool_min: int,
        pool_max: int | None = None,
        namespace: str | None = None,
    ) -> SandboxPool:
        """Set `poolMin` (and `poolMax`; without it, raised to `pool_min` when below it)."""
        for attempt in range(5):
            raw = await self.get_pool_raw(name, namespace=namespace)
            capacity = raw.setdefault("spec", {}).setdefault("capacity", {})
            capacity["poolMin"] = pool_min
            if pool_max is not None:
                capacity["poolMax"] = pool_max
            else:
                capacity["poolMax"] = max(int(capacity.get("poolMax", 1)), pool_min)
            try:
                return await self.update_pool(raw, namespace=namespace)
            except Conflict:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    async def get_pool_raw(self, name: str, *, namespace: str | None = None) -> dict[str, Any]:
        ref = fastpath_pb2.ObjectRef(namespace=self._ns(namespace), name=name)
        reply: fastpath_pb2.ObjectReply = await self._unary(self._fastpath().GetPool, ref)
        return _core.parse_wire(reply.object_json)

    async def get_pool(self, name: str, *, namespace: str | None = None) -> SandboxPool:
        return _core.pool_from_wire(await self.get_pool_raw(name, namespace=namespace))

    async def list_pools_raw(
        self, *, namespace: str | None = None, all_namespaces: bool = False
    ) -> builtins.list[dict[str, Any]]:
        ns = "" if all_namespaces else self._ns(namespace)
        reply: fastpath_pb2.ListReply = await self._unary(
            self._fastpath().ListPools, _core.list_request(ns, None)
        )
        return [_core.parse_wire(text) for text in reply.objects_json]

    async def list_pools(
        self, *, namespace: str | None = None, all_namespaces: bool = False
    ) -> builtins.list[SandboxPool]:
        raw = await self.list_pools_raw(namespace=namespace, all_namespaces=all_namespaces)
        return [_core.pool_from_wire(item) for item in raw]

    async def delete_pool(self, name: str, *, namespace: str | None = None) -> str:
        ref = fastpath_pb2.ObjectRef(namespace=self._ns(namespace), name=name)
        reply: fastpath_pb2.DeleteReply = await self._unary(self._fastpath().DeletePool, ref)
        return reply.phase
