"""Fast Sandbox: isolated containers in milliseconds, and a Python SDK to work inside them.

    from fastsandbox import Sandbox

    with Sandbox.create(image="busybox") as sb:
        print(sb.commands.run("echo hi").stdout)

The SDK names are loaded on first use (PEP 562): the CLI and the servers import this package
too, and must not pay for grpc and the SDK at start-up.
"""

from __future__ import annotations

# Not `from typing import ...`: typing (and what it imports) is a tenth of `fsb exec`'s
# start-up, and every entry point imports this package. mypy reads the name as typing's.
TYPE_CHECKING = False

# The one version string: the wheel's (pyproject reads it, [tool.hatch.version]), `fsb
# --version`, the image tag (scripts/build-image) and the default agent image; the manifests in
# deploy/ and the Helm chart spell it too, and tests/unit/test_version.py keeps them equal.
__version__ = "0.1.0"

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
        Unauthenticated,
        Unavailable,
    )
    from fastsandbox.sdk import (
        AsyncClient,
        AsyncSandbox,
        Client,
        CommandHandle,
        CommandResult,
        EntryInfo,
        Sandbox,
    )

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
    "EntryInfo",
    "FailedPrecondition",
    "FsbError",
    "InvalidArgument",
    "NotFound",
    "Sandbox",
    "Unauthenticated",
    "Unavailable",
]

_SDK = frozenset(__all__) - {
    "AlreadyExists",
    "CapacityExhausted",
    "CommandFailed",
    "CommandTimeout",
    "Conflict",
    "FailedPrecondition",
    "FsbError",
    "InvalidArgument",
    "NotFound",
    "Unauthenticated",
    "Unavailable",
}


def __getattr__(name: str) -> Any:
    if name in _SDK:
        from fastsandbox import sdk

        return getattr(sdk, name)
    if name in __all__:
        from fastsandbox import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'fastsandbox' has no attribute {name!r}")
