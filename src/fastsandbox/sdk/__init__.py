"""The Python SDK of Fast Sandbox: `Client`, `AsyncClient` and the `Sandbox` handle.

    from fastsandbox.sdk import Client

    with Client() as client:
        result = client.create("demo", "busybox", command=["echo", "hello"])
        print(result.agent, result.endpoints, result.timings.runtime_ready_ms)

Every failure is an `FsbError` subclass (see `fastsandbox.errors`), re-exported here.
"""

from fastsandbox.errors import (
    AlreadyExists,
    CapacityExhausted,
    Conflict,
    FsbError,
    InvalidArgument,
    NotFound,
    RuntimeFailure,
    Unauthenticated,
    Unavailable,
)
from fastsandbox.sdk._core import CreateOptions, CreateResult, PoolOptions
from fastsandbox.sdk._logs import LogRecord
from fastsandbox.sdk.aio import AsyncClient
from fastsandbox.sdk.sandbox import Sandbox
from fastsandbox.sdk.sync import Client

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "CapacityExhausted",
    "Client",
    "Conflict",
    "CreateOptions",
    "CreateResult",
    "FsbError",
    "InvalidArgument",
    "LogRecord",
    "NotFound",
    "PoolOptions",
    "RuntimeFailure",
    "Sandbox",
    "Unauthenticated",
    "Unavailable",
]
