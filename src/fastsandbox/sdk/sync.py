"""`Client`: the blocking twin of `AsyncClient`, with no logic of its own (the kr8s habit).

Each `Client` owns a private event loop running in a daemon thread; every method hands the
matching `AsyncClient` coroutine to that loop and waits for it. This works the same from plain
scripts and from inside someone else's running event loop (where `asyncio.run` would refuse),
and the gRPC channel lives in one loop for its whole life, as grpc.aio requires.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Generator, Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, Unpack

from fastsandbox.sdk._core import CreateOptions, CreateResult, PoolOptions, TokenInfo
from fastsandbox.sdk._logs import LogRecord, Since
from fastsandbox.sdk.aio import AsyncClient

if TYPE_CHECKING:
    from fastsandbox.api.models import Event, Sandbox, SandboxPool

T = TypeVar("T")


class _LoopThread:
    """An event loop in a daemon thread that runs coroutines for a blocking caller."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fsb-client-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        finished = threading.Event()

        async def guarded() -> T:
            try:
                return await coro
            finally:
                finished.set()

        future = asyncio.run_coroutine_threadsafe(guarded(), self._loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C lands here in the caller's thread: cancel the coroutine and let it unwind
            # (close its gRPC call) before the interrupt propagates.
            future.cancel()
            finished.wait(timeout=5)
            raise

    @property
    def closed(self) -> bool:
        return self._loop.is_closed()

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


async def _next(iterator: AsyncIterator[T]) -> T:
    return await anext(iterator)


class Client:
    """Blocking client for `fsb server`; same arguments and methods as `AsyncClient`.

    Use as `with Client() as client:` or call `close()` (which also stops its loop thread).
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
        # Resolve first: a bad config raises here without leaving a thread behind.
        self._aio = AsyncClient(
            endpoint,
            token,
            namespace,
            timeout=timeout,
            token_file=token_file,
            ca_file=ca_file,
            insecure=insecure,
        )
        self._aio._linger = 0  # the loop below is this client's alone and ends with it
        self._loop = _LoopThread()

    @property
    def endpoint(self) -> str:
        return self._aio.endpoint

    @property
    def namespace(self) -> str:
        return self._aio.namespace

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and stop the loop thread; calling it again does nothing."""
        if self._loop.closed:
            return
        try:
            self._loop.run(self._aio.close())
        finally:
            self._loop.stop()

    def create_token(
        self, namespace: str, *, ttl: int | timedelta | None = None
    ) -> tuple[TokenInfo, str]:
        return self._loop.run(self._aio.create_token(namespace, ttl=ttl))

    def list_tokens(self) -> builtins.list[TokenInfo]:
        return self._loop.run(self._aio.list_tokens())

    def revoke_token(self, token_id: str) -> None:
        self._loop.run(self._aio.revoke_token(token_id))

    def create(self, name: str, image: str, **options: Unpack[CreateOptions]) -> CreateResult:
        return self._loop.run(self._aio.create(name, image, **options))

    def get(self, name: str, *, namespace: str | None = None) -> Sandbox:
        return self._loop.run(self._aio.get(name, namespace=namespace))

    def get_raw(self, name: str, *, namespace: str | None = None) -> dict[str, Any]:
        return self._loop.run(self._aio.get_raw(name, namespace=namespace))

    def list(
        self,
        *,
        namespace: str | None = None,
        all_namespaces: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> builtins.list[Sandbox]:
        return self._loop.run(
            self._aio.list(namespace=namespace, all_namespaces=all_namespaces, labels=labels)
        )

    def list_raw(
        self,
        *,
        namespace: str | None = None,
        all_namespaces: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> builtins.list[dict[str, Any]]:
        return self._loop.run(
            self._aio.list_raw(namespace=namespace, all_namespaces=all_namespaces, labels=labels)
        )

    def delete(self, name: str, *, wait: bool = False, namespace: str | None = None) -> str:
        return self._loop.run(self._aio.delete(name, wait=wait, namespace=namespace))

    def update(
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
        return self._loop.run(
            self._aio.update(
                name,
                ttl=ttl,
                expire_time=expire_time,
                no_expiry=no_expiry,
                labels=labels,
                failure_policy=failure_policy,
                recovery_timeout=recovery_timeout,
                namespace=namespace,
            )
        )

    def reset(self, name: str, *, namespace: str | None = None) -> Sandbox:
        return self._loop.run(self._aio.reset(name, namespace=namespace))

    def events(
        self, name: str, *, kind: str = "Sandbox", limit: int = 0, namespace: str | None = None
    ) -> builtins.list[Event]:
        return self._loop.run(self._aio.events(name, kind=kind, limit=limit, namespace=namespace))

    def events_raw(
        self, name: str, *, kind: str = "Sandbox", limit: int = 0, namespace: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        return self._loop.run(
            self._aio.events_raw(name, kind=kind, limit=limit, namespace=namespace)
        )

    def logs(
        self,
        name: str,
        *,
        follow: bool = False,
        namespace: str | None = None,
        tail: int = 0,
        since: Since | None = None,
    ) -> Iterator[bytes]:
        records = self.log_records(name, follow=follow, namespace=namespace, tail=tail, since=since)
        try:
            for record in records:
                yield record.data
        finally:
            records.close()

    def log_records(
        self,
        name: str,
        *,
        follow: bool = False,
        namespace: str | None = None,
        tail: int = 0,
        since: Since | None = None,
    ) -> Generator[LogRecord, None, None]:
        """See `AsyncClient.log_records`: stdout and stderr apart, with their timestamps."""
        chunks = self._aio.log_records(
            name, follow=follow, namespace=namespace, tail=tail, since=since
        )
        try:
            while True:
                try:
                    chunk = self._loop.run(_next(chunks))
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            # Interrupted mid-chunk, the cancelled generator has already closed its call.
            with contextlib.suppress(RuntimeError):
                self._loop.run(chunks.aclose())

    def create_pool(self, name: str, **options: Unpack[PoolOptions]) -> SandboxPool:
        return self._loop.run(self._aio.create_pool(name, **options))

    def create_pool_object(
        self, pool: SandboxPool | Mapping[str, Any], *, namespace: str | None = None
    ) -> SandboxPool:
        return self._loop.run(self._aio.create_pool_object(pool, namespace=namespace))

    def update_pool(
        self, pool: SandboxPool | Mapping[str, Any], *, namespace: str | None = None
    ) -> SandboxPool:
        return self._loop.run(self._aio.update_pool(pool, namespace=namespace))

    def scale_pool(
        self,
        name: str,
        *,
        pool_min: int,
        pool_max: int | None = None,
        namespace: str | None = None,
    ) -> SandboxPool:
        return self._loop.run(
            self._aio.scale_pool(name, pool_min=pool_min, pool_max=pool_max, namespace=namespace)
        )

    def get_pool(self, name: str, *, namespace: str | None = None) -> SandboxPool:
        return self._loop.run(self._aio.get_pool(name, namespace=namespace))

    def get_pool_raw(self, name: str, *, namespace: str | None = None) -> dict[str, Any]:
        return self._loop.run(self._aio.get_pool_raw(name, namespace=namespace))

    def list_pools(
        self, *, namespace: str | None = None, all_namespaces: bool = False
    ) -> builtins.list[SandboxPool]:
        return self._loop.run(
            self._aio.list_pools(namespace=namespace, all_namespaces=all_namespaces)
        )

    def list_pools_raw(
        self, *, namespace: str | None = None, all_namespaces: bool = False
    ) -> builtins.list[dict[str, Any]]:
        return self._loop.run(
            self._aio.list_pools_raw(namespace=namespace, all_namespaces=all_namespaces)
        )

    def delete_pool(self, name: str, *, namespace: str | None = None) -> str:
        return self._loop.run(self._aio.delete_pool(name, namespace=namespace))
