"""`AsyncSandbox`: one sandbox to work in, shaped like E2B's SDK; `Sandbox` is its sync twin.

    async with await AsyncSandbox.create(image="busybox") as sb:
        r = await sb.commands.run("echo hi")

Leaving the block deletes the sandbox. With `lease=SECONDS` the sandbox lives only while this
process renews the lease (a task here renews it every third of the lease), so an owner that
crashes never leaks its sandbox. A server without RenewLease answers UNIMPLEMENTED: the task
then logs it once and stops, and the sandbox lives by its TTL alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2
from fastsandbox.errors import InvalidArgument, NotFound
from fastsandbox.sdk._core import DEFAULT_POOL, CreateOptions
from fastsandbox.sdk._logs import LogRecord, Since
from fastsandbox.sdk.aio import AsyncClient
from fastsandbox.sdk.commands import AsyncCommands
from fastsandbox.sdk.files import AsyncFiles
from fastsandbox.sdk.pty import AsyncPty

if TYPE_CHECKING:
    from fastsandbox.api import models

log = logging.getLogger(__name__)

# A lease shorter than this cannot be renewed reliably across one slow round trip.
MIN_LEASE_SECONDS = 2


def unique_name(prefix: str = "sb") -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


class AsyncSandbox:
    """A running sandbox: `.commands`, `.files`, `.pty`, `.logs()`, `.set_timeout()`, `.kill()`."""

    def __init__(self, client: AsyncClient, obj: models.Sandbox, *, owns_client: bool) -> None:
        self.client = client
        self._obj = obj
        self._owns_client = owns_client
        ns, name = obj.metadata.namespace, obj.metadata.name
        self.commands = AsyncCommands(client, ns, name)
        self.files = AsyncFiles(client, ns, name)
        self.pty = AsyncPty(client, ns, name)
        self._lease_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ making one

    @classmethod
    async def create(
        cls,
        image: str,
        *,
        name: str | None = None,
        pool: str = DEFAULT_POOL,
        command: Sequence[str] | str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        ports: Sequence[int] = (),
        ttl: int | None = None,
        lease: int | None = None,
        mode: str = "fast",
        endpoint: str | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        namespace: str | None = None,
        labels: Mapping[str, str] | None = None,
        resources: Mapping[str, str] | None = None,
    ) -> AsyncSandbox:
        """Start a sandbox and answer once it runs. `name=None` picks a unique name; `command=None`
        keeps it up, idle, for commands; `ttl` and `lease` are seconds."""
        from fastsandbox.sdk import _core

        if lease is not None and lease < MIN_LEASE_SECONDS:
            raise InvalidArgument(f"lease_seconds: must be at least {MIN_LEASE_SECONDS}")
        client = AsyncClient(endpoint, token, namespace, token_file=token_file, ca_file=ca_file)
        try:
            options: CreateOptions = {"pool": pool, "mode": mode, "ports": list(ports)}
            if command is not None:
                options["command"] = (
                    ["/bin/sh", "-c", command] if isinstance(command, str) else command
                )
            if env:
                options["env"] = env
            if workdir:
                options["working_dir"] = workdir
            if ttl is not None:
                options["ttl"] = ttl
            if labels:
                options["labels"] = labels
            if resources:
                options["resources"] = resources
            request = _core.create_request(client.namespace, name or unique_name(), image, options)
            if lease is not None:
                request.lease_seconds = lease
            stub, _ = client._rpc()
            reply = await client._unary(stub.Create, request)
            result = _core.create_result(reply)
        except BaseException:
            await client.close()
            raise
        sb = cls(client, result.object, owns_client=True)
        sb._timings = result.timings
        if lease is not None:
            sb._lease_task = asyncio.get_running_loop().create_task(sb._renew(lease))
        return sb

    @classmethod
    async def connect(
        cls,
        name: str,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        namespace: str | None = None,
    ) -> AsyncSandbox:
        """A handle on an existing sandbox (NotFound if there is none). It does not renew a
        lease nor delete the sandbox on exit unless `kill()` is called."""
        client = AsyncClient(endpoint, token, namespace, token_file=token_file, ca_file=ca_file)
        try:
            obj = await client.get(name)
        except BaseException:
            await client.close()
            raise
        sb = cls(client, obj, owns_client=True)
        sb._connected = True
        return sb

    _timings: models.Timings | None = None
    _connected = False

    # ------------------------------------------------------------------ what it is

    @property
    def name(self) -> str:
        return self._obj.metadata.name

    @property
    def namespace(self) -> str:
        return self._obj.metadata.namespace

    @property
    def id(self) -> str:
        """The sandbox's uid (unique across recreations of the same name)."""
        return self._obj.metadata.uid

    @property
    def sandbox_id(self) -> str:
        return self.id

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(self._obj.status.endpoints)

    @property
    def timings(self) -> models.Timings | None:
        """How long create took per step (ms); from the create reply, else the stored object."""
        return self._timings or self._obj.status.timings

    @property
    def object(self) -> models.Sandbox:
        return self._obj

    async def refresh(self) -> models.Sandbox:
        self._obj = await self.client.get(self.name, namespace=self.namespace)
        return self._obj

    async def is_running(self) -> bool:
        try:
            return (await self.refresh()).status.phase.value == "Running"
        except NotFound:
            return False

    # ------------------------------------------------------------------ doing things

    async def logs(
        self, *, follow: bool = False, tail: int = 0, since: Since | None = None
    ) -> AsyncIterator[bytes]:
        """The main process's output; with `follow`, until the sandbox ends; `tail` lines from
        the end, or only what was written `since` (unix seconds, datetime, or timedelta ago)."""
        async for chunk in self.client.logs(
            self.name, follow=follow, namespace=self.namespace, tail=tail, since=since
        ):
            yield chunk

    async def log_records(
        self, *, follow: bool = False, tail: int = 0, since: Since | None = None
    ) -> AsyncIterator[LogRecord]:
        """Its output with stdout and stderr apart, each record stamped (`Client.log_records`)."""
        async for record in self.client.log_records(
            self.name, follow=follow, namespace=self.namespace, tail=tail, since=since
        ):
            yield record

    async def set_timeout(self, seconds: int) -> None:
        """Expire `seconds` from now (E2B's `set_timeout`)."""
        self._obj = await self.client.update(self.name, ttl=seconds, namespace=self.namespace)

    async def _renew(self, lease: int) -> None:
        every = max(lease / 3, 0.5)
        while True:
            await asyncio.sleep(every)
            stub, metadata = self.client._rpc()
            request = fastpath_pb2.RenewLeaseRequest(namespace=self.namespace, name=self.name)
            try:
                await stub.RenewLease(request, metadata=metadata, timeout=every)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                if code is grpc.StatusCode.UNIMPLEMENTED:
                    log.warning(
                        "the server does not renew leases yet; %s lives by its TTL only",
                        self.name,
                    )
                    return
                if code is grpc.StatusCode.NOT_FOUND:
                    return  # deleted: nothing left to keep alive
                # A missed renewal is retried at the next tick; the lease has room for two.
                log.warning(
                    "lease renewal of %s failed: %s", self.name, self.client._translate(err)
                )

    async def get(self) -> models.Sandbox:
        """The object as the server has it now."""
        return await self.refresh()

    async def events(self, *, limit: int = 0) -> list[models.Event]:
        return await self.client.events(self.name, limit=limit, namespace=self.namespace)

    async def update(self, **changes: Any) -> models.Sandbox:
        """Change expiry, labels, failure policy or recovery timeout (see `AsyncClient.update`)."""
        self._obj = await self.client.update(self.name, namespace=self.namespace, **changes)
        return self._obj

    async def reset(self) -> models.Sandbox:
        """Recreate the container from the same spec (see `AsyncClient.reset`)."""
        self._obj = await self.client.reset(self.name, namespace=self.namespace)
        return self._obj

    async def delete(self, *, wait: bool = True) -> None:
        """Delete; already gone is fine. `wait` returns once the container is really removed."""
        await self._stop_renewing()
        with contextlib.suppress(NotFound):
            await self.client.delete(self.name, wait=wait, namespace=self.namespace)

    async def kill(self) -> None:
        """Delete the sandbox now (already gone is fine) and wait until it is removed."""
        await self._stop_renewing()
        with contextlib.suppress(NotFound):
            await self.client.delete(self.name, wait=True, namespace=self.namespace)

    async def _stop_renewing(self) -> None:
        task, self._lease_task = self._lease_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        """Stop renewing and close the connection (the sandbox itself stays)."""
        await self._stop_renewing()
        if self._owns_client:
            await self.client.close()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.kill()
        finally:
            await self.close()
