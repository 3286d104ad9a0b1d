"""Bearer-token authentication for the Fast-Path.

The API starts root containers, so it is never open: every call carries
`authorization: Bearer <token>`. The admin token is given with `--token-file` / `FSB_TOKEN` or
generated once into the data dir (mode 0600, where the CLI on the same machine finds it). Who may
do what is decided in `access.py` / `authz.py`; health checks are exempt.

The interceptor itself lives in `fastsandbox._grpc_auth`, shared with the agent's API; it is
re-exported here so `from fastsandbox.control.fastpath.auth import TokenAuth` keeps working.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fastsandbox._grpc_auth import HEALTH_CHECK, Handler, TokenAuth

EXEMPT = frozenset({HEALTH_CHECK})

__all__ = ["EXEMPT", "Handler", "TokenAuth", "load_or_create_token"]


def load_or_create_token(path: Path, given: str | None) -> str:
    """The token to require: `given`, else the one in `path`, else a new one written there."""
    if given:
        return given
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    # O_EXCL + 0600 from the first byte: never a moment where others can read it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
