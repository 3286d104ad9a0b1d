"""The one error tree of Fast Sandbox, and the one table that maps it to gRPC and exit codes.

Every failure a user can see is one of these, split by what the caller should do next::

    FsbError                 (anything else)              gRPC INTERNAL           exit 1
    ├── InvalidArgument      fix the request              gRPC INVALID_ARGUMENT   exit 2
    ├── NotFound             check the name / namespace   gRPC NOT_FOUND          exit 3
    ├── AlreadyExists        pick another name / key      gRPC ALREADY_EXISTS     exit 4
    ├── Conflict             re-read and retry            gRPC ABORTED            exit 4
    │   └── FailedPrecondition  wrong state for the call (a sandbox not Running, a
    │                        directory where a file is wanted)  gRPC FAILED_PRECONDITION  exit 4
    ├── CapacityExhausted    wait, delete, or grow pool   gRPC RESOURCE_EXHAUSTED exit 5
    ├── Unauthenticated      give a valid token           gRPC UNAUTHENTICATED    exit 6
    │   └── PermissionDenied ask for the right to do it   gRPC PERMISSION_DENIED  exit 6
    ├── Unavailable          retry later                  gRPC UNAVAILABLE        exit 7
    ├── RuntimeFailure       the runtime said no          gRPC INTERNAL           exit 1
    ├── CommandFailed        `CommandResult.check()` on a non-zero exit   exit = the command's
    └── CommandTimeout       a command outlived its timeout (and was killed)      exit 124

Exit codes are for scripts: 0 ok, 1 failure, 2 usage or validation, 3 not found, 4 already exists
or conflict, 5 capacity exhausted, 6 unauthenticated or permission denied, 7 unavailable (the
server could not be reached or is overloaded: worth a retry).
CommandTimeout and CommandFailed are raised by the client (SDK, CLI), never sent over gRPC.

Third-party errors (grpc, containerd, sqlite, kubernetes) are translated into this tree at one
seam each; the gRPC status codes and CLI exit codes are mapped here, in `TABLE`, and nowhere
else: `FsbError.grpc_code` / `exit_code` are filled from it, `from_grpc` reads it backwards.

grpc itself is imported only when a `grpc.StatusCode` is asked for: the rows name their status,
so `fsb exec`'s lean client (cli/wire/) maps a status it read off the wire (`from_status`)
without paying grpc's start-up.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Final

    import grpc


class FsbError(Exception):
    """Base of every error Fast Sandbox raises on purpose."""

    # Filled from `TABLE` below; declared here so every subclass has them.
    grpc_code: grpc.StatusCode
    status: str
    """The gRPC status code's name (`grpc_code.name`)."""
    exit_code: int

    # Seconds the server asked the caller to wait before retrying (its `retry-after` trailing
    # metadata, sent with RESOURCE_EXHAUSTED by the rate limit); None when it named none.
    retry_after: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(FsbError):
    pass


class NotFound(FsbError):
    pass


class AlreadyExists(FsbError):
    pass


class Conflict(FsbError):
    """An optimistic-concurrency check failed: the object changed since it was read."""


class FailedPrecondition(Conflict):
    """The object is not in a state the call needs (e.g. exec into a sandbox that is not running,
    renewing the lease of a sandbox that has none). A `Conflict` so that callers catching that
    keep working."""


class CapacityExhausted(FsbError):
    pass


class Unauthenticated(FsbError):
    pass


class PermissionDenied(Unauthenticated):
    """Authenticated, but not allowed (RBAC, file modes). A subclass: the remedy is the same
    conversation with whoever hands out credentials."""


class Unavailable(FsbError):
    """Nothing answered, or what answered is not ready or overloaded: retrying may succeed."""


class RuntimeFailure(FsbError):
    """containerd/runc refused or failed; the message carries the runtime's words."""


# gRPC's status codes by name, with their numbers on the wire (fixed by the gRPC protocol;
# `grpc.StatusCode` carries the same pairs, tests/unit/test_errors.py checks).
STATUS_NUMBERS: Final[dict[str, int]] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip
STATUS_NAMES: Final[dict[int, str]] = {number: name for name, number in STATUS_NUMBERS.items()}

RETRY_AFTER_KEY: Final = "retry-after"
"""Trailing metadata of a RESOURCE_EXHAUSTED that names when to retry (seconds, decimal);
clients read it into `FsbError.retry_after`."""


class CommandTimeout(FsbError):
    """A command in a sandbox ran past its timeout and was killed.

    Exit 124 as GNU `timeout` uses it: `fsb exec` passes the command's own code through, so its
    failures cannot reuse 1-7 without looking like the command's.
    """


class CommandFailed(FsbError):
    """`CommandResult.check()` on a non-zero exit; `exit_code` is the command's own."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# The one table: error class ⇄ gRPC status code (by name) ⇄ CLI exit code. `TABLE` is these
# rows with `grpc.StatusCode`s.
ROWS: Final[tuple[tuple[type[FsbError], str, int], ...]] = (
    (FsbError, "INTERNAL", 1),
    (InvalidArgument, "INVALID_ARGUMENT", 2),
    (NotFound, "NOT_FOUND", 3),
    (AlreadyExists, "ALREADY_EXISTS", 4),
    (Conflict, "ABORTED", 4),
    (CapacityExhausted, "RESOURCE_EXHAUSTED", 5),
    (Unauthenticated, "UNAUTHENTICATED", 6),
    (PermissionDenied, "PERMISSION_DENIED", 6),
    (Unavailable, "UNAVAILABLE", 7),
    (RuntimeFailure, "INTERNAL", 1),
    (FailedPrecondition, "FAILED_PRECONDITION", 4),
)

if TYPE_CHECKING:
    TABLE: tuple[tuple[type[FsbError], grpc.StatusCode, int], ...]

# Codes received that no class sends, and what they mean to the caller.
_RECEIVED_ALSO: Final[dict[str, type[FsbError]]] = {
    "DEADLINE_EXCEEDED": Unavailable,  # no answer in time: retry later
}


class _GrpcCode:
    """`FsbError.grpc_code`: the class's row as a `grpc.StatusCode`, grpc imported on first use.
    A non-data descriptor, so an instance may still carry its own code (a relayed status)."""

    def __get__(self, obj: object, owner: type[FsbError]) -> grpc.StatusCode:
        import grpc

        return grpc.StatusCode[owner.status]


setattr(FsbError, "grpc_code", _GrpcCode())  # noqa: B010 (the annotation above stays the type)
for _cls, _status, _exit in ROWS:
    _cls.status = _status
    _cls.exit_code = _exit

# Raised by clients only, never sent as a gRPC status. CommandTimeout exits 124 as GNU `timeout`
# does, since `fsb exec` passes the command's own exit code through and 1-7 would look like the
# command's; CommandFailed exits with the command's own code (set per instance).
CLIENT_ONLY: Final[tuple[type[FsbError], ...]] = (CommandTimeout, CommandFailed)
CommandTimeout.exit_code = 124

# Received INTERNAL is RuntimeFailure (the later row wins): our servers send INTERNAL for those.
_BY_STATUS: Final[dict[str, type[FsbError]]] = {
    **{status: cls for cls, status, _ in ROWS},
    **_RECEIVED_ALSO,
}

# How grpc's own client-side failures begin, when no server answered at all (connection refused,
# no such socket, DNS). A server's UNAVAILABLE says something else ("agent ... is unreachable:
# failed to connect ..." quotes one, which is why these are prefixes and not substrings).
_NEVER_REACHED: Final = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "dns resolution failed",
    "errors resolving",
    "name resolution failure",
    "empty address list",
)
# grpc's own words when the call's deadline passed without any status from the server.
_CLIENT_DEADLINE: Final = "deadline exceeded"


def exit_code_of(exc: BaseException) -> int:
    """The CLI exit code for `exc`: its row of `TABLE`; 1 for anything that is not ours."""
    return exc.exit_code if isinstance(exc, FsbError) else 1


def _name(code: grpc.StatusCode | str | None) -> str | None:
    return code if code is None or isinstance(code, str) else code.name


def never_answered(code: grpc.StatusCode | str | None, details: str | None) -> bool:
    """True when grpc itself failed the call because no server answered: it could not connect
    (refused, no socket, DNS), or the deadline passed with no status. An UNAVAILABLE that a
    server sent is not this: its reason is the server's and must reach the user. `code` is a
    `grpc.StatusCode` or its name."""
    text = (details or "").strip().lower()
    name = _name(code)
    if name == "UNAVAILABLE":
        return text.startswith(_NEVER_REACHED)
    return name == "DEADLINE_EXCEEDED" and text == _CLIENT_DEADLINE


def from_grpc(
    code: grpc.StatusCode | str | None,
    details: str | None,
    *,
    fallback: type[FsbError] = FsbError,
) -> FsbError:
    """Translate a gRPC status (a `grpc.StatusCode` or its name) back into the tree; `details`
    becomes the message. A code the table does not know (UNKNOWN, UNIMPLEMENTED, ...) becomes
    `fallback`."""
    name = _name(code)
    cls = _BY_STATUS.get(name, fallback) if name is not None else fallback
    return cls(details or name or "unknown error")


def __getattr__(name: str) -> Any:
    if name == "TABLE":  # the rows with grpc's codes: imports grpc, so only when asked for
        import grpc

        table = tuple((cls, grpc.StatusCode[status], code) for cls, status, code in ROWS)
        globals()["TABLE"] = table
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLIENT_ONLY",
    "RETRY_AFTER_KEY",
    "ROWS",
    "STATUS_NAMES",
    "STATUS_NUMBERS",
    "TABLE",
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
    "exit_code_of",
    "from_grpc",
    "never_answered",
]
