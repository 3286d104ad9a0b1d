"""Unit-tier defaults: the Fast-Path fakes here (tests/unit/fastpath_fake.py, io_fastpath_fake.py)
serve plaintext gRPC on loopback, so SDK/CLI clients in this tier are told so, as a user of
`fsb server --insecure` would be (`FSB_INSECURE=1`). TLS itself is tested in test_access.py,
and against a real server in tests/e2e."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def plaintext_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSB_INSECURE", "1")
    for var in ("FSB_CA_FILE", "FSB_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
