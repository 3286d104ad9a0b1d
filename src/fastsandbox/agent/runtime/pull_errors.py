"""What a failed pull tells the caller: our own words for the kind of failure, never the
registry's.

`ctr images pull` puts whatever the remote sent into its error: the status line's text (which the
remote picks) and, for many errors, its response body ("Server message: ..."). A request naming
an image could use that to read a service it should not reach, so the caller gets only the kind
of failure and the numeric HTTP status; the full stderr goes to the agent's log (debug), which
only operators read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastsandbox.errors import FsbError, NotFound, PermissionDenied, RuntimeFailure, Unavailable

# "unexpected status from HEAD request to https://r/v2/x/manifests/1: 401 Unauthorized"
_STATUS = re.compile(r"(?:unexpected status|status code)[^\n]*?:\s*(\d{3})\b")


@dataclass(frozen=True, slots=True)
class PullFailure:
    kind: type[FsbError]
    reason: str


def classify(stderr: str, registry: str) -> PullFailure:
    """The kind and a safe reason of a failed pull from `registry`, from ctr's stderr."""
    text = stderr.lower()
    status = _STATUS.search(text)
    code = int(status.group(1)) if status else None
    if code in (401, 403) or "unauthorized" in text or "authorization failed" in text:
        return PullFailure(
            PermissionDenied,
            f"registry {registry} refused access (HTTP {code or 401}): "
            "give pull credentials it accepts",
        )
    if code == 404 or "not found" in text:
        return PullFailure(NotFound, f"image not found on registry {registry}")
    if "server gave http response to https client" in text:
        return PullFailure(
            RuntimeFailure,
            f"registry {registry} speaks plain HTTP: add it to insecure_registries",
        )
    if "x509" in text or "certificate" in text or "tls:" in text:
        return PullFailure(
            RuntimeFailure, f"the TLS certificate of registry {registry} is not trusted"
        )
    if "connection refused" in text or "connect:" in text:
        return PullFailure(Unavailable, f"cannot connect to registry {registry}")
    if "no such host" in text or "lookup " in text:
        return PullFailure(Unavailable, f"cannot resolve registry host {registry}")
    if "timeout" in text or "deadline exceeded" in text:
        return PullFailure(Unavailable, f"registry {registry} did not answer in time")
    if code is not None:
        return PullFailure(RuntimeFailure, f"registry {registry} answered HTTP {code}")
    return PullFailure(RuntimeFailure, "ctr images pull failed (the agent's log has its output)")
