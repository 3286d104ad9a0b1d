"""The one table: every error class ⇄ its gRPC code ⇄ its CLI exit code, pinned. Scripts depend
on these numbers; changing one is a breaking change and must fail here first."""

from __future__ import annotations

import inspect

import grpc
import pytest

from fastsandbox import errors
from fastsandbox.errors import (
    CLIENT_ONLY,
    TABLE,
    AlreadyExists,
    CapacityExhausted,
    CommandFailed,
    CommandTimeout,
    Conflict,
    FailedPrecondition,
    FsbError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RuntimeFailure,
    Unauthenticated,
    Unavailable,
    exit_code_of,
    from_grpc,
    never_answered,
)

S = grpc.StatusCode

PINNED = [
    (FsbError, S.INTERNAL, 1),
    (InvalidArgument, S.INVALID_ARGUMENT, 2),
    (NotFound, S.NOT_FOUND, 3),
    (AlreadyExists, S.ALREADY_EXISTS, 4),
    (Conflict, S.ABORTED, 4),
    (CapacityExhausted, S.RESOURCE_EXHAUSTED, 5),
    (Unauthenticated, S.UNAUTHENTICATED, 6),
    (PermissionDenied, S.PERMISSION_DENIED, 6),
    (Unavailable, S.UNAVAILABLE, 7),
    (RuntimeFailure, S.INTERNAL, 1),
    (FailedPrecondition, S.FAILED_PRECONDITION, 4),
]


def test_the_table_is_pinned() -> None:
    assert list(TABLE) == PINNED


def test_every_error_class_has_a_row() -> None:
    classes = {
        obj for _, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, FsbError)
    }
    assert classes == {cls for cls, _, _ in TABLE} | set(CLIENT_ONLY)


def test_client_only_errors_exit_as_a_command_would() -> None:
    assert exit_code_of(CommandTimeout("slow")) == 124
    assert exit_code_of(CommandFailed("exit 3", exit_code=3)) == 3


@pytest.mark.parametrize(("cls", "code", "exit_code"), PINNED)
def test_each_class_carries_its_row(
    cls: type[FsbError], code: grpc.StatusCode, exit_code: int
) -> None:
    exc = cls("m")
    assert (exc.grpc_code, exc.exit_code, exit_code_of(exc)) == (code, exit_code, exit_code)


@pytest.mark.parametrize(("cls", "code", "exit_code"), PINNED)
def test_a_sent_code_comes_back_as_its_class(
    cls: type[FsbError], code: grpc.StatusCode, exit_code: int
) -> None:
    """What a server sends for `cls` is read back as `cls` (INTERNAL as RuntimeFailure: the two
    share the code, and both exit 1)."""
    back = from_grpc(code, "the server's words")
    assert back.message == "the server's words"
    assert exit_code_of(back) == exit_code
    assert type(back) is (RuntimeFailure if code is S.INTERNAL else cls)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (S.DEADLINE_EXCEEDED, Unavailable),
        (S.UNKNOWN, FsbError),
        (S.UNIMPLEMENTED, FsbError),
        (None, FsbError),
    ],
)
def test_codes_no_class_sends(code: grpc.StatusCode | None, cls: type[FsbError]) -> None:
    assert type(from_grpc(code, "x")) is cls
    assert type(from_grpc(S.UNKNOWN, "x", fallback=RuntimeFailure)) is RuntimeFailure


def test_not_ours_exits_1() -> None:
    assert exit_code_of(ValueError("x")) == 1


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        # grpc's own words when nothing answered
        (
            S.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
            "Failed to connect to remote host: Connection refused",
            True,
        ),
        (S.UNAVAILABLE, "errors resolving nowhere.invalid:1: Domain name not found", True),
        (S.UNAVAILABLE, "DNS resolution failed for nowhere:1", True),
        (S.DEADLINE_EXCEEDED, "Deadline Exceeded", True),
        # a server's answer, even one that quotes a connection failure of its own
        (S.UNAVAILABLE, "agent at unix:///a.sock is unreachable: failed to connect", False),
        (S.UNAVAILABLE, "no agent ready yet in pool default/default-pool", False),
        (S.DEADLINE_EXCEEDED, "agent a1 did not answer within 30s", False),
        (S.NOT_FOUND, "failed to connect to all addresses", False),
    ],
)
def test_never_answered(code: grpc.StatusCode, details: str, expected: bool) -> None:
    assert never_answered(code, details) is expected
