"""Where the agent finds `fsb-supervisor`, the static PID-1 binary mounted into every sandbox.

Without it a sandbox's own process is PID 1 and ignores SIGTERM (PID 1 gets no default signal
actions), so every delete would wait the whole grace period; zombies would never be reaped.
Looked up in order: `$FSB_SUPERVISOR_PATH` (or its older name `$FSB_INIT_PATH`), the source
checkout's build output (`scripts/setup` runs `scripts/build-native`, which installs it into
`native/bin/`), then the system install path.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_PATH = Path("/usr/local/libexec/fastsandbox/fsb-supervisor")
_CHECKOUT_PATH = Path(__file__).resolve().parents[3] / "native" / "bin" / "fsb-supervisor"


def find_init() -> Path | None:
    given = os.environ.get("FSB_SUPERVISOR_PATH") or os.environ.get("FSB_INIT_PATH")
    candidates = [Path(given)] if given else [_CHECKOUT_PATH, SYSTEM_PATH]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None
