"""Where the agent finds `fsb-init`, the static PID-1 helper mounted into every sandbox.

Without it a sandbox's own process is PID 1 and ignores SIGTERM (PID 1 gets no default signal
actions), so every delete would wait the whole grace period; zombies would never be reaped.
Looked up in order: `$FSB_INIT_PATH`, the source checkout's build output (`scripts/setup` builds
it there), then the system install path.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_PATH = Path("/usr/local/libexec/fastsandbox/fsb-init")
_CHECKOUT_PATH = Path(__file__).resolve().parents[3] / "native" / "fsb-init" / "fsb-init"


def find_init() -> Path | None:
    given = os.environ.get("FSB_INIT_PATH")
    candidates = [Path(given)] if given else [_CHECKOUT_PATH, SYSTEM_PATH]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None
