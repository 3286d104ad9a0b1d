"""Every example of docs/sdk.md runs, against the real relay and a process-running fake agent
(tests/e2e/test_exec_files.py runs them against a real server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs_examples import python_blocks, run_block
from tests.unit.fastpath_fake import TOKEN, isolate_env
from tests.unit.io_fastpath_fake import Rig, serve_io

BLOCKS = python_blocks("sdk.md")


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    isolate_env(monkeypatch, tmp_path)
    with serve_io(tmp_path) as rig:
        monkeypatch.setenv("FSB_ENDPOINT", rig.endpoint)
        monkeypatch.setenv("FSB_TOKEN", TOKEN)
        yield rig


def test_the_page_has_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_example_runs(rig: Rig, name: str, code: str) -> None:
    run_block(code, name)
    assert rig.fastpath.sandboxes == {}  # every example cleans up after itself
