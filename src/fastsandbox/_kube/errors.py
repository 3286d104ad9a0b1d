"""The one seam where apiserver and transport failures become `fastsandbox.errors`.

    404 NotFound                    → NotFound
    409 AlreadyExists (on create)   → AlreadyExists
    409 Conflict (resourceVersion)  → Conflict        read it again and retry
    410 Gone / Expired (watch)      → Conflict        list again and watch from there
    400, 422 Invalid                → InvalidArgument with the apiserver's field messages
    401                             → Unauthenticated (credentials)
    403                             → PermissionDenied (RBAC)
    429, 5xx, connection failures   → Unavailable

`what` names the object the caller was working on ("Sandbox default/a") so messages say which.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
from lightkube import ApiError

from fastsandbox.errors import (
    AlreadyExists,
    Conflict,
    FsbError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)


def from_status(status: dict[str, Any], what: str) -> FsbError:
    """A Kubernetes `Status` (an error answer, or a watch ERROR event's object) → our error."""
    code = int(status.get("code") or 0)
    reason = str(status.get("reason") or "")
    message = str(status.get("message") or reason or f"HTTP {code}")
    if code == 404:
        details = status.get("details") or {}
        if details.get("kind") == "namespaces":
            return NotFound(f"{what}: namespace {details.get('name', '')!r} not found")
        return NotFound(f"{what} not found")
    if code == 409 and reason == "AlreadyExists":
        return AlreadyExists(f"{what} already exists: pick another name")
    if code == 409:
        return Conflict(f"{what} was modified meanwhile ({message}): read it again and retry")
    if code == 410 or reason in ("Expired", "Gone"):
        return Conflict(
            f"{what}: {message}; that resourceVersion is no longer retained: "
            "list again and watch from the list's resourceVersion"
        )
    if code in (400, 422):
        causes = (status.get("details") or {}).get("causes") or []
        fields = [
            f"{c['field']}: {c.get('message', '')}" if c.get("field") else str(c.get("message"))
            for c in causes
        ]
        return InvalidArgument(f"{what} is invalid: {'; '.join(fields) if fields else message}")
    if code == 403:
        return PermissionDenied(
            f"the Kubernetes apiserver forbids {what}: {message} (check the RBAC rules)"
        )
    if code == 401:
        return Unauthenticated(
            f"the Kubernetes apiserver refused {what}: {message} (check the credentials)"
        )
    if code == 429 or code >= 500:
        return Unavailable(f"the Kubernetes apiserver could not serve {what}: {message}")
    return FsbError(f"{what}: {message} (HTTP {code})")


def from_response(response: httpx2.Response, what: str) -> FsbError:
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("kind") != "Status":
        text = response.text[:300]
        body = {"code": response.status_code, "message": text or response.reason_phrase}
    body.setdefault("code", response.status_code)
    return from_status(body, what)


def translate(exc: BaseException, what: str) -> FsbError:
    """Any failure of a lightkube or httpx2 call → our error (FsbError passes through)."""
    if isinstance(exc, FsbError):
        return exc
    if isinstance(exc, ApiError):
        if exc.response is not None:
            return from_response(exc.response, what)
        return from_status(exc.status.to_dict(), what)
    if isinstance(exc, httpx2.HTTPStatusError):
        return from_response(exc.response, what)
    if isinstance(exc, httpx2.TransportError):
        return Unavailable(f"cannot reach the Kubernetes apiserver for {what}: {exc!r}")
    return FsbError(f"{what}: {exc!r}")
