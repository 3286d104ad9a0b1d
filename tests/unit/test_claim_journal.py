"""The claim journal's reading (runtime/claim_records.py): which claims a restarted agent must
still record."""

from __future__ import annotations

import json
from pathlib import Path

from fastsandbox.agent.runtime.claim_records import JOURNAL, Claimed, unrecorded


def _claim(cid: str, sid: str) -> bytes:
    claim = Claimed(
        sid, ["sh", "-c", "x"], ["A=1"], "/w", {"pids": {"limit": 9}}, {"k": "v"},
        scope="sock|ns", container_id=cid,
    )  # fmt: skip
    return b'{"claim":' + claim.to_json() + b"}\n"


def test_claims_without_done_are_left_and_a_line_cut_short_is_skipped(tmp_path: Path) -> None:
    done = json.dumps({"done": "w-1"}).encode() + b"\n"
    cut = _claim("w-3", "sb-3")[:40]  # its writer died mid-line, before it answered
    (tmp_path / JOURNAL).write_bytes(_claim("w-1", "sb-1") + _claim("w-2", "sb-2") + done + cut)
    left = unrecorded(tmp_path)
    assert list(left) == ["w-2"]
    claim = left["w-2"]
    assert (claim.sandbox_id, list(claim.argv), list(claim.env), claim.cwd) == (
        "sb-2", ["sh", "-c", "x"], ["A=1"], "/w",
    )  # fmt: skip
    assert (dict(claim.resources), dict(claim.labels), claim.scope) == (
        {"pids": {"limit": 9}}, {"k": "v"}, "sock|ns",
    )  # fmt: skip


def test_no_journal_means_nothing_to_record(tmp_path: Path) -> None:
    assert unrecorded(tmp_path / "missing") == {}
