"""Property-based fuzzing of `fsb apply` documents (issue 12): what `fsb apply -f` parses and
validates before it sends anything (`load_documents`), over YAML built from valid Sandbox and
SandboxPool documents with fields dropped, replaced by any YAML value, or added, and over raw
text. Plus the CLI itself on an oversized file and an alias bomb.

Property: every input is accepted or refused with `InvalidArgument` (nothing else escapes, no
hang: hypothesis' deadline is off, the run's wall clock shows a hang), and a refusal of a
document names it and the field (`document 2 (Sandbox x): spec.image: ...`); oversized input is
refused with the limit in the message.

Size: FSB_FUZZ_EXAMPLES (default 500, as CI runs it); `make fuzz` runs 10 000.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsandbox.cli.commands.apply import MAX_APPLY_BYTES, MAX_YAML_NODES, load_documents
from fastsandbox.errors import InvalidArgument

EXAMPLES = int(os.environ.get("FSB_FUZZ_EXAMPLES", "500"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("FSB_FUZZ_RANDOM") is None,
)
FSB = str(Path(sys.executable).parent / "fsb")

SANDBOX: dict[str, Any] = {
    "apiVersion": "fastsandbox.io/v1alpha1",
    "kind": "Sandbox",
    "metadata": {"name": "box", "labels": {"team": "a"}},
    "spec": {
        "image": "busybox:latest",
        "poolRef": "default-pool",
        "command": ["sleep", "3600"],
        "env": [{"name": "A", "value": "1"}],
        "exposedPorts": [8080],
        "failurePolicy": "Manual",
        "recoveryTimeoutSeconds": 30,
        "resources": {"cpu": "500m", "memory": "256Mi"},
    },
}
POOL: dict[str, Any] = {
    "apiVersion": "fastsandbox.io/v1alpha1",
    "kind": "SandboxPool",
    "metadata": {"name": "pool"},
    "spec": {
        "runtime": "runc",
        "capacity": {"poolMin": 1, "poolMax": 2},
        "maxSandboxesPerAgent": 4,
    },
}
# A refusal of a document names it, then a field path: `document 1 (Sandbox box): spec.x: `,
# or says what the document as a whole lacks.
NAMED = re.compile(
    r"^document \d+ \((Sandbox|SandboxPool) .*?\): (\w|\[).*?: |"
    r"^document \d+: (expected a mapping|kind must be)"
)
yaml_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        parent: Any = doc
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["drop", "replace", "add"]))
        if action == "drop" and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(yaml_value)
        else:
            with contextlib.suppress(IndexError, KeyError, TypeError):
                parent[path[-1]] = draw(yaml_value)
    return doc


documents = st.lists(mutated(SANDBOX) | mutated(POOL) | yaml_value, min_size=1, max_size=3).map(
    lambda docs: yaml.safe_dump_all(docs, sort_keys=False)
)


def _check(text: str) -> None:
    try:
        docs = load_documents(text, "default")
    except InvalidArgument as exc:
        message = exc.message
        assert message, "a refusal without a message"
        if message.startswith("document"):
            assert NAMED.match(message), f"the refusal names no field: {message!r}"
        return
    assert docs, "accepted nothing without saying so"


@SETTINGS
@given(documents)
def test_fuzzed_documents_are_accepted_or_refused_naming_the_field(text: str) -> None:
    _check(text)


@SETTINGS
@given(st.text(max_size=400))
def test_any_text_is_accepted_or_refused_cleanly(text: str) -> None:
    _check(text)


def _apply(path: Path) -> subprocess.CompletedProcess[str]:
    # Refused before any connection: the endpoint answers nothing.
    return subprocess.run(
        [FSB, "apply", "-f", str(path), "--endpoint", "127.0.0.1:1"],
        env={**os.environ, "FSB_TOKEN": "x"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_oversized_file_is_refused_with_the_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_APPLY_BYTES // 10 + 1))
    got = _apply(big)
    assert got.returncode == InvalidArgument.exit_code, got.stderr
    assert str(MAX_APPLY_BYTES) in got.stderr


def test_an_alias_bomb_is_refused_with_the_limit(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    got = _apply(bomb)
    assert got.returncode == InvalidArgument.exit_code, got.stderr
    assert str(MAX_YAML_NODES) in got.stderr
