"""The Python SDK of Fast Sandbox, shaped like E2B's: `Sandbox` / `AsyncSandbox` to work inside
one sandbox, `Client` / `AsyncClient` for the whole API.

    from fastsandbox import Sandbox

    with Sandbox.create(image="busybox", env={"A": "1"}) as sb:
        r = sb.commands.run("echo $A; exit 3")  # r.exit_code == 3, r.stdout == "1\\n"
        sb.files.write("/tmp/x.txt", "data")

Every failure is an `FsbError` subclass (see `fastsandbox.errors`), re-exported here.

The names are loaded on first use (PEP 562), like the top package's: importing one light
module of the SDK (`sdk._resolve`, which `fsb exec` uses) must not import grpc and all of it.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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

# name -> the module that defines it.
_HOME = {
    **dict.fromkeys(
        ("AlreadyExists", "CapacityExhausted", "CommandFailed", "CommandTimeout", "Conflict",
         "FailedPrecondition", "FsbError", "InvalidArgument", "NotFound", "RuntimeFailure",
         "Unauthenticated", "Unavailable"),
        "fastsandbox.errors",
    ),
    **dict.fromkeys(("CreateOptions", "CreateResult", "PoolOptions"), "fastsandbox.sdk._core"),
    "LogRecord": "fastsandbox.sdk._logs",
    "AsyncClient": "fastsandbox.sdk.aio",
    "CommandResult": "fastsandbox.sdk.commands",
    "EntryInfo": "fastsandbox.sdk.files",
    "CommandHandle": "fastsandbox.sdk.sandbox",
    "Sandbox": "fastsandbox.sdk.sandbox",
    "AsyncSandbox": "fastsandbox.sdk.sandbox_aio",
    "Client": "fastsandbox.sdk.sync",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


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
