"""The Python SDK of Fast Sandbox, shaped like E2B's: `Sandbox` / `AsyncSandbox` to work inside
one sandbox, `Client` / `AsyncClient` for the whole API.

    from fastsandbox import Sandbox

    with Sandbox.create(image="busybox", env={"A": "1"}) as sb:
        r = sb.commands.run("echo $A; exit 3")  # r.exit_code == 3, r.stdout == "1\\n"
        sb.files.write("/tmp/x.txt", "data")

Every failure is an `FsbError` subclass (see `fastsandbox.errors`), re-exported here.
"""

from fastsandbox.errors import (
    AlreadyExists,
    CapacityExhausted,
    CommandFailed,
    CommandTimeout,
    Conflict,
    FailedPrecondition,
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
from fastsandbox.sdk.commands import CommandResult
from fastsandbox.sdk.files import EntryInfo
from fastsandbox.sdk.sandbox import CommandHandle, Sandbox
from fastsandbox.sdk.sandbox_aio import AsyncSandbox
from fastsandbox.sdk.sync import Client

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncSandbox",
    "CapacityExhausted",
    "Client",
    "CommandFailed",
    "CommandHandle",
    "CommandResult",
    "CommandTimeout",
    "Conflict",
    "CreateOptions",
    "CreateResult",
    "EntryInfo",
    "FailedPrecondition",
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
