"""Where the agent finds `fsb-logger`, containerd's `binary://` log driver for sandboxes.

The shim, not the agent, starts it, so it must be a path on the host (in a Pod: staged into the
agent's host directory). Looked up in order: `$FSB_LOGGER_PATH`, the source checkout's build
output (`scripts/setup` builds it into native/bin/), then the system install path.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_PATH = Path("/usr/local/libexec/fastsandbox/fsb-logger")
_CHECKOUT_PATH = Path(__file__).resolve().parents[3] / "native" / "bin" / "fsb-logger"


def find_logger() -> Path | None:
    given = os.environ.get("FSB_LOGGER_PATH")
    candidates = [Path(given)] if given else [_CHECKOUT_PATH, SYSTEM_PATH]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None
