"""Log caps (fsb-logger keeps the newest half twice over): the smallest keeps a few full-length
(16 KiB) lines in each half; the default fits a long build log. Defined once, here, in a module
with no imports, so `settings` (and through it every CLI verb) need not load pydantic."""

from __future__ import annotations

from typing import Final

MIN_LOG_MAX_BYTES: Final = 64 * 1024
DEFAULT_LOG_MAX_BYTES: Final = 10 * 1024**2
