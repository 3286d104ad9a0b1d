"""The ```python blocks of a docs page, for tests that run every one of them."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[tuple[str, str]]:
    """(id, code) of each block of `docs/<page>`; the id is the heading above it."""
    text = (DOCS / page).read_text()
    out = []
    for match in _BLOCK.finditer(text):
        headings = re.findall(r"^## (.+)$", text[: match.start()], re.M)
        out.append((headings[-1] if headings else page, match.group(1)))
    return out


def run_block(code: str, name: str, replace: dict[str, str] | None = None) -> None:
    for old, new in (replace or {}).items():
        code = code.replace(old, new)
    exec(compile(code, f"<docs {name}>", "exec"), {"__name__": "__main__"})
