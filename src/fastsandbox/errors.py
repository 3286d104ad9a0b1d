"""The one error tree of Fast Sandbox.

Every failure a user can see is one of these, split by what the caller should do next::

    FsbError
    ├── InvalidArgument      fix the request            gRPC INVALID_ARGUMENT   exit 2
    ├── NotFound             check the name / namespace  gRPC NOT_FOUND          exit 3
    ├── AlreadyExists        pick another name / key     gRPC ALREADY_EXISTS     exit 4
    ├── Conflict             re-read and retry           gRPC ABORTED            exit 4
    │   └── FailedPrecondition  the object is in the wrong state (a sandbox that is not
    │                        running, a directory where a file is wanted)  FAILED_PRECONDITION
    ├── CapacityExhausted    wait, delete, or grow pool  gRPC RESOURCE_EXHAUSTED exit 5
    ├── Unauthenticated      give a valid token          gRPC UNAUTHENTICATED    exit 6
    ├── PermissionDenied     a path's permissions say no gRPC PERMISSION_DENIED  exit 6
    ├── Unavailable          retry later                 gRPC UNAVAILABLE        exit 6
    ├── RuntimeFailure       the runtime said no         gRPC INTERNAL           exit 1
    ├── CommandFailed        `CommandResult.check()` on a non-zero exit    exit = the command's
    └── CommandTimeout       a command outlived its timeout (client side)  exit 124

Third-party errors (grpc, containerd, sqlite, kubernetes) are translated into this tree at one
seam each; the gRPC status code and CLI exit code are mapped here and nowhere else.
"""

from __future__ import annotations

import grpc


class FsbError(Exception):
    """Base of every error Fast Sandbox raises on purpose."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(FsbError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    exit_code = 2


class NotFound(FsbError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    exit_code = 3


class AlreadyExists(FsbError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    exit_code = 4


class Conflict(FsbError):
    """An optimistic-concurrency check failed: the object changed since it was read."""

    grpc_code = grpc.StatusCode.ABORTED
    exit_code = 4


class FailedPrecondition(Conflict):
    """The object is not in a state the call needs (e.g. the sandbox is not running). A
    `Conflict` so that callers catching that keep working."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    exit_code = 4


class CapacityExhausted(FsbError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    exit_code = 5


class Unauthenticated(FsbError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    exit_code = 6


class PermissionDenied(FsbError):
    """A file operation inside a sandbox was refused by the path's permissions."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    exit_code = 6


class Unavailable(FsbError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    exit_code = 6


class RuntimeFailure(FsbError):
    """containerd/runc refused or failed; the message carries the runtime's words."""

    grpc_code = grpc.StatusCode.INTERNAL
    exit_code = 1


class CommandTimeout(FsbError):
    """A command in a sandbox ran past its timeout and was killed.

    Exit 124 as GNU `timeout` uses it: `fsb exec` passes the command's own code through, so its
    failures cannot reuse 1-7 without looking like the command's.
    """

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    exit_code = 124


class CommandFailed(FsbError):
    """`CommandResult.check()` on a non-zero exit; `exit_code` is the command's own."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


_BY_CODE: dict[grpc.StatusCode, type[FsbError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        CapacityExhausted,
        Unauthenticated,
        Unavailable,
        RuntimeFailure,
    )
}
_BY_CODE[grpc.StatusCode.ABORTED] = Conflict
_BY_CODE[grpc.StatusCode.FAILED_PRECONDITION] = FailedPrecondition
_BY_CODE[grpc.StatusCode.PERMISSION_DENIED] = PermissionDenied
_BY_CODE[grpc.StatusCode.DEADLINE_EXCEEDED] = Unavailable


def from_grpc(code: grpc.StatusCode | None, details: str | None) -> FsbError:
    """Translate a gRPC status received from one of our servers back into the tree."""
    cls = _BY_CODE.get(code, FsbError) if code is not None else FsbError
    return cls(details or (code.name if code is not None else "unknown error"))


__all__ = [
    "AlreadyExists",
    "CapacityExhausted",
    "CommandFailed",
    "CommandTimeout",
    "Conflict",
    "FailedPrecondition",
    "FsbError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RuntimeFailure",
    "Unauthenticated",
    "Unavailable",
    "from_grpc",
]
