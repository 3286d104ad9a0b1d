"""`Sandbox`: a handle on one running sandbox, shaped like E2B's (`Sandbox.create(...)`).

A convenience over `Client` for the common script: create, read logs, delete on the way out::

    with Sandbox.create(client, "job-1", "busybox", command=["echo", "hi"]) as sb:
        print(b"".join(sb.logs()))

Exec arrives with a later issue; this stays a thin wrapper with no logic the clients lack.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Unpack

from fastsandbox.errors import NotFound
from fastsandbox.sdk._core import CreateOptions, CreateResult
from fastsandbox.sdk._logs import LogRecord, Since
from fastsandbox.sdk.sync import Client

if TYPE_CHECKING:
    from fastsandbox.api import models


class Sandbox:
    """One sandbox; as a context manager it is deleted (and waited for) on exit."""

    def __init__(self, client: Client, result: CreateResult, *, owns_client: bool = False) -> None:
        self.client = client
        self.result = result
        self._owns_client = owns_client

    @classmethod
    def create(
        cls,
        client: Client | None,
        name: str,
        image: str,
        **options: Unpack[CreateOptions],
    ) -> Sandbox:
        """Create a sandbox; `client=None` makes a `Client()` from the environment and owns it."""
        owned = client is None
        client = Client() if client is None else client
        try:
            result = client.create(name, image, **options)
        except BaseException:
            if owned:
                client.close()
            raise
        return cls(client, result, owns_client=owned)

    @property
    def name(self) -> str:
        return self.result.name

    @property
    def namespace(self) -> str:
        return self.result.namespace

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.result.endpoints

    def get(self) -> models.Sandbox:
        """The object as the server has it now."""
        return self.client.get(self.name, namespace=self.namespace)

    def logs(
        self, *, follow: bool = False, tail: int = 0, since: Since | None = None
    ) -> Iterator[bytes]:
        return self.client.logs(
            self.name, follow=follow, namespace=self.namespace, tail=tail, since=since
        )

    def log_records(
        self, *, follow: bool = False, tail: int = 0, since: Since | None = None
    ) -> Iterator[LogRecord]:
        """Its output with stdout and stderr apart (see `Client.log_records`)."""
        return self.client.log_records(
            self.name, follow=follow, namespace=self.namespace, tail=tail, since=since
        )

    def events(self, *, limit: int = 0) -> list[models.Event]:
        """What happened to it so far, oldest first (see `Client.events`)."""
        return self.client.events(self.name, limit=limit, namespace=self.namespace)

    def update(
        self,
        *,
        ttl: int | timedelta | None = None,
        expire_time: datetime | str | None = None,
        no_expiry: bool = False,
        labels: Mapping[str, str | None] | None = None,
        failure_policy: str | None = None,
        recovery_timeout: int | None = None,
    ) -> models.Sandbox:
        """Change expiry, labels, failure policy or recovery timeout (see `Client.update`)."""
        return self.client.update(
            self.name,
            ttl=ttl,
            expire_time=expire_time,
            no_expiry=no_expiry,
            labels=labels,
            failure_policy=failure_policy,
            recovery_timeout=recovery_timeout,
            namespace=self.namespace,
        )

    def reset(self) -> models.Sandbox:
        """Recreate the container from the same spec (see `Client.reset`)."""
        return self.client.reset(self.name, namespace=self.namespace)

    def delete(self, *, wait: bool = True) -> None:
        """Delete; already gone is fine. `wait` returns once the container is really removed."""
        with contextlib.suppress(NotFound):
            self.client.delete(self.name, wait=wait, namespace=self.namespace)

    def close(self) -> None:
        """Close the client if this handle created it (does not delete the sandbox)."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.delete()
        finally:
            self.close()
