"""`fsb run`'s pull line: shown on a terminal when the pool has no copy of the image, confirmed
or erased by the reply's pulledMs, and silent when stderr is not a terminal."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace
from typing import Any

from fastsandbox.cli import pull_progress as pp
from fastsandbox.errors import NotFound

IMAGE = "127.0.0.1:5000/busybox:latest"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Pools:
    def __init__(self, cached: list[str] | None) -> None:
        self.cached = cached
        self.asked: list[tuple[str, str | None]] = []

    def get_pool(self, name: str, *, namespace: str | None = None) -> Any:
        self.asked.append((name, namespace))
        if self.cached is None:
            raise NotFound(f"pool {name} not found")
        return SimpleNamespace(status=SimpleNamespace(cached_images=self.cached))


def test_a_cold_image_shows_the_line_then_the_agents_measurement(monkeypatch: Any) -> None:
    monkeypatch.setattr(pp, "TICK_SECONDS", 0.01)
    out = _Tty()
    pools = _Pools(cached=["127.0.0.1:5000/other:1"])
    with pp.pull_progress(pools, IMAGE, {"pool": "p", "namespace": "ns"}, stream=out) as bar:
        time.sleep(0.05)
        bar.done(1234.0)
    text = out.getvalue()
    assert f"pulling {IMAGE}…" in text
    assert text.endswith(f"pulled {IMAGE} in 1.2s\n")
    assert pools.asked == [("p", "ns")]


def test_a_cached_image_says_nothing_unless_a_pull_happened(monkeypatch: Any) -> None:
    out = _Tty()
    with pp.pull_progress(_Pools(cached=[IMAGE]), IMAGE, {}, stream=out) as bar:
        bar.done(None)
    assert out.getvalue() == ""
    out = _Tty()
    with pp.pull_progress(_Pools(cached=[IMAGE]), IMAGE, {}, stream=out) as bar:
        bar.done(50.0)  # cached elsewhere, pulled where it landed: still reported
    assert out.getvalue() == f"pulled {IMAGE} in 0.1s\n"


def test_not_a_terminal_or_an_unknown_pool_is_silent() -> None:
    out = io.StringIO()
    pools = _Pools(cached=[])
    with pp.pull_progress(pools, IMAGE, {}, stream=out) as bar:
        bar.done(999.0)
    assert out.getvalue() == "" and pools.asked == []  # not even asked
    tty = _Tty()
    with pp.pull_progress(_Pools(cached=None), IMAGE, {}, stream=tty) as bar:
        bar.done(None)
    assert tty.getvalue() == ""
