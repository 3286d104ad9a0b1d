"""Regressions found by fuzzing `fsb apply` documents (tests/fuzz/test_apply_fuzz.py)."""

from __future__ import annotations

import pytest

from fastsandbox.cli.commands.apply import MAX_APPLY_BYTES, MAX_YAML_NODES, load_documents
from fastsandbox.errors import InvalidArgument

SPEC = "spec: {image: busybox, poolRef: p}\n"


@pytest.mark.parametrize("meta", ["'0'", "true", "[a, b]", "3"])
def test_a_scalar_metadata_is_refused_naming_the_field(meta: str) -> None:
    # Used to escape as ValueError / TypeError (a traceback instead of a message).
    with pytest.raises(InvalidArgument, match=r"document 1 \(Sandbox \?\): metadata: expected"):
        load_documents(f"kind: Sandbox\nmetadata: {meta}\n{SPEC}", "default")


def test_an_odd_unknown_key_is_quoted_in_the_path() -> None:
    with pytest.raises(InvalidArgument, match=r"\[' '\]: unknown field"):
        load_documents(f"kind: Sandbox\nmetadata: {{name: b}}\n{SPEC}' ': 1\n", "default")


def test_oversized_input_names_the_limit() -> None:
    with pytest.raises(InvalidArgument, match=str(MAX_APPLY_BYTES)):
        load_documents("#" * (MAX_APPLY_BYTES + 1), "default")


def test_an_alias_bomb_names_the_limit() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    with pytest.raises(InvalidArgument, match=str(MAX_YAML_NODES)):
        load_documents("\n".join(lines), "default")
