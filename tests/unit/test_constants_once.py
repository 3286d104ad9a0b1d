"""Labels and defaults are spelled once: `fastsandbox.io/...` keys in `api/labels.py`, the
default endpoint in `settings.py`. Everything else imports them, so a key cannot drift between
the agent that writes a label and the janitor or recovery that reads it back."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import fastsandbox
from fastsandbox.settings import DEFAULT_ENDPOINT

SRC = Path(fastsandbox.__file__).parent


def _string_literals(path: Path) -> Iterator[tuple[int, str]]:
    """Every string constant in `path` except docstrings (prose may name a key)."""
    tree = ast.parse(path.read_text(), str(path))
    prose = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            yield node.lineno, node.value


def _offenders(needle: str, home: Path) -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if "_proto" in path.parts or path == home:
            continue
        for line, text in _string_literals(path):
            if needle in text:
                found.append(f"{path.relative_to(SRC)}:{line}: {text!r}")
    return found


@pytest.mark.parametrize(
    ("needle", "home"),
    [
        ("fastsandbox.io/", SRC / "api" / "labels.py"),
        (DEFAULT_ENDPOINT, SRC / "settings.py"),
    ],
)
def test_spelled_only_at_home(needle: str, home: Path) -> None:
    assert home.exists()
    assert _offenders(needle, home) == [], f"import these from {home.relative_to(SRC)}"


def test_the_check_sees_a_literal(tmp_path: Path) -> None:
    """The scan is not blind: a literal is found, a docstring is not."""
    sample = tmp_path / "sample.py"
    sample.write_text('"""Uses fastsandbox.io/x."""\nKEY = "fastsandbox.io/x"\n')
    assert list(_string_literals(sample)) == [(2, "fastsandbox.io/x")]
