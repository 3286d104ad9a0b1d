"""The one seam where a supervisor's `{"code": "<ERRNO>", "message": ..., "path": ...}` becomes
a `fastsandbox.errors` class. The supervisor's message already names the path
(`open /tmp/x: No such file or directory`); the code picks what the caller should do next."""

from __future__ import annotations

from typing import Any

from fastsandbox.errors import (
    AlreadyExists,
    CapacityExhausted,
    FailedPrecondition,
    FsbError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RuntimeFailure,
)

_BY_ERRNO: dict[str, type[FsbError]] = {
    "ENOENT": NotFound,
    "ESRCH": NotFound,
    "EISDIR": FailedPrecondition,
    "ENOTDIR": FailedPrecondition,
    "ENOTEMPTY": FailedPrecondition,
    "EBUSY": FailedPrecondition,
    "EXDEV": FailedPrecondition,
    "EEXIST": AlreadyExists,
    "EACCES": PermissionDenied,
    "EPERM": PermissionDenied,
    "EINVAL": InvalidArgument,
    "E2BIG": InvalidArgument,
    "ENOSPC": CapacityExhausted,
    # Beyond PROTOCOL.md's list, passed through from the kernel by the supervisor.
    "ELOOP": FailedPrecondition,
    "ETXTBSY": FailedPrecondition,
    "ENOEXEC": FailedPrecondition,
    "EROFS": PermissionDenied,
    "ENAMETOOLONG": InvalidArgument,
    "EDQUOT": CapacityExhausted,
}


def translate(error: Any, sandbox_id: str) -> FsbError:
    """The error a supervisor reply carried, as our error tree."""
    if not isinstance(error, dict):
        return RuntimeFailure(f"sandbox {sandbox_id}: supervisor error without details")
    code = str(error.get("code", ""))
    message = str(error.get("message") or code or "supervisor error")
    path = error.get("path")
    if isinstance(path, str) and path and path not in message:
        message = f"{path}: {message}"
    cls = _BY_ERRNO.get(code, RuntimeFailure)
    if cls is RuntimeFailure:
        message = f"sandbox {sandbox_id}: {message} ({code or 'no code'})"
    return cls(message)
