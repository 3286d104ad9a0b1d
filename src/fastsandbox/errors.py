"""The one error tree of Fast Sandbox.

Every failure a user can see is one of these, split by what the caller should do next::

    FsbError
    ├── InvalidArgument      fix the request            gRPC INVALID_ARGUMENT   exit 2
    ├── NotFound             check the name / namespace  gRPC NOT_FOUND          exit 3
    ├── AlreadyExists        pick another name / key     gRPC ALREADY_EXISTS     exit 4
    ├── Conflict             re-read and retry           gRPC ABORTED            exit 4
    │   └── FailedPrecondition  not in a state for it    gRPC FAILED_PRECONDITION exit 4
    ├── CapacityExhausted    wait, delete, or grow pool  gRPC RESOURCE_EXHAUSTED exit 5
    ├── Unauthenticated      give a valid token          gRPC UNAUTHENTICATED    exit 6
    ├── Unavailable          retry later                 gRPC UNAVAILABLE        exit 6
    └── RuntimeFailure       the runtime said no         gRPC INTERNAL           exit 1

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
    """The object exists but is not in a state for this call (e.g. renewing the lease of a
    sandbox that has none)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class CapacityExhausted(FsbError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    exit_code = 5


class Unauthenticated(FsbError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    exit_code = 6


class Unavailable(FsbError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    exit_code = 6


class RuntimeFailure(FsbError):
    """containerd/runc refused or failed; the message carries the runtime's words."""

    grpc_code = grpc.StatusCode.INTERNAL
    exit_code = 1


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
_BY_CODE[grpc.StatusCode.DEADLINE_EXCEEDED] = Unavailable


def from_grpc(code: grpc.StatusCode | None, details: str | None) -> FsbError:
    """Translate a gRPC status received from one of our servers back into the tree."""
    cls = _BY_CODE.get(code, FsbError) if code is not None else FsbError
    return cls(details or (code.name if code is not None else "unknown error"))


__all__ = [
    "AlreadyExists",
    "CapacityExhausted",
    "Conflict",
    "FailedPrecondition",
    "FsbError",
    "InvalidArgument",
    "NotFound",
    "RuntimeFailure",
    "Unauthenticated",
    "Unavailable",
    "from_grpc",
]
