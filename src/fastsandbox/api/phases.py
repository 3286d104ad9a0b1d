"""A sandbox's lifecycle: the phases and the one table of moves allowed between them.

Status changes go through `transition()`, so an exited process can never be shown `Running` again
by a late write, an `Expired` record never comes back to life, and `Terminating` is final.
"""

from __future__ import annotations

from fastsandbox.api.models import Condition, SandboxPhase, SandboxStatus, now
from fastsandbox.errors import Conflict

P = SandboxPhase

ALLOWED: dict[SandboxPhase, frozenset[SandboxPhase]] = {
    P.PENDING: frozenset({P.SCHEDULED, P.RUNNING, P.FAILED, P.EXPIRED, P.TERMINATING}),
    P.SCHEDULED: frozenset({P.PENDING, P.RUNNING, P.FAILED, P.EXPIRED, P.TERMINATING}),
    # Running → Running: a reset or a reschedule starts a new container.
    P.RUNNING: frozenset(
        {P.RUNNING, P.SUCCEEDED, P.FAILED, P.EXPIRED, P.LOST, P.PENDING, P.TERMINATING}
    ),
    # A reset starts an exited or lost sandbox again.
    P.SUCCEEDED: frozenset({P.RUNNING, P.PENDING, P.EXPIRED, P.TERMINATING}),
    P.FAILED: frozenset({P.RUNNING, P.PENDING, P.EXPIRED, P.TERMINATING}),
    P.LOST: frozenset({P.RUNNING, P.PENDING, P.FAILED, P.SUCCEEDED, P.EXPIRED, P.TERMINATING}),
    P.EXPIRED: frozenset({P.TERMINATING}),
    P.TERMINATING: frozenset(),
}

TERMINAL = frozenset({P.SUCCEEDED, P.FAILED, P.EXPIRED})
# Phases in which the sandbox's container holds a slot on its agent.
HOLDS_SLOT = frozenset({P.SCHEDULED, P.RUNNING, P.LOST, P.TERMINATING})


def can_move(current: SandboxPhase, to: SandboxPhase) -> bool:
    return (to is current and to is not P.RUNNING) or to in ALLOWED[current]


def transition(
    status: SandboxStatus, to: SandboxPhase, *, reason: str = "", message: str = ""
) -> None:
    """Move `status` to phase `to`, or raise Conflict if the table forbids it."""
    if not can_move(status.phase, to):
        raise Conflict(f"a {status.phase.value} sandbox cannot become {to.value}")
    status.phase = to
    if message or reason:
        status.message = message or reason


def set_condition(
    status: SandboxStatus, type_: str, value: bool, *, reason: str = "", message: str = ""
) -> bool:
    """Add or update one condition; returns True when something changed. The transition time
    moves only when the value flips, as in Kubernetes."""
    text = "True" if value else "False"
    for i, cond in enumerate(status.conditions):
        if cond.type == type_:
            if cond.status == text and cond.reason == reason and cond.message == message:
                return False
            when = cond.last_transition_time if cond.status == text else now()
            status.conditions[i] = Condition(
                type=type_, status=text, reason=reason, message=message, last_transition_time=when
            )
            return True
    status.conditions.append(Condition(type=type_, status=text, reason=reason, message=message))
    return True


def condition(status: SandboxStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)
