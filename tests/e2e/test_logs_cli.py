"""`fsb logs` end to end on both shapes: stdout and stderr apart, --tail, --since, --timestamps,
and `-f` ending when the sandbox ends. Output goes container → shim → fsb-logger → agent →
control plane → CLI, all real."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import AnyServer

pytestmark = pytest.mark.e2e

STAMPED = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (.*)$")


@pytest.fixture(scope="module")
def server(shaped_server: AnyServer) -> AnyServer:
    return shaped_server


@pytest.fixture
def cleanup(server: AnyServer) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        server.fsb("delete", name, "--wait")


def wait_for(server: AnyServer, name: str, out: str, err: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = server.fsb("logs", name)
        if got.returncode == 0 and got.stdout == out and got.stderr == err:
            return
        time.sleep(0.2)
    raise AssertionError(f"logs of {name}: {got!r}")


def test_streams_apart_tail_since_timestamps(
    server: AnyServer, demo_image: str, cleanup: list[str]
) -> None:
    cleanup.append("logs-apart")
    script = "echo out1; echo err1 >&2; echo out2; sleep 1; echo out3; echo err3 >&2; sleep 3600"
    run = server.fsb("run", "logs-apart", "--image", demo_image, "--", "sh", "-c", script)
    assert run.returncode == 0, run.stderr
    wait_for(server, "logs-apart", "out1\nout2\nout3\n", "err1\nerr3\n")

    tail = server.fsb("logs", "logs-apart", "--tail", "2")
    assert (tail.returncode, tail.stdout, tail.stderr) == (0, "out3\n", "err3\n")

    stamped = server.fsb("logs", "logs-apart", "--timestamps")
    assert stamped.returncode == 0, stamped.stderr
    lines = [STAMPED.match(line) for line in stamped.stdout.splitlines()]
    assert all(lines) and [m.group(2) for m in lines if m] == ["out1", "out2", "out3"]
    assert [STAMPED.match(x).group(2) for x in stamped.stderr.splitlines()] == ["err1", "err3"]  # type: ignore[union-attr]
    out3_at = lines[2].group(1)  # type: ignore[union-attr]

    since = server.fsb("logs", "logs-apart", "--since", out3_at)
    assert (since.returncode, since.stdout, since.stderr) == (0, "out3\n", "err3\n")
    since_long_ago = server.fsb("logs", "logs-apart", "--since", "1h")
    assert since_long_ago.stdout == "out1\nout2\nout3\n"
    both = server.fsb("logs", "logs-apart", "--since", out3_at, "--tail", "1", "-t")
    assert both.stdout == "" and STAMPED.match(both.stderr.strip())

    bad = server.fsb("logs", "logs-apart", "--since", "yesterday")
    assert bad.returncode != 0 and "--since" in bad.stderr


def test_follow_ends_when_the_sandbox_exits(
    server: AnyServer, demo_image: str, cleanup: list[str]
) -> None:
    cleanup.append("logs-follow")
    script = "echo begin; sleep 2; echo end >&2; printf bye"
    run = server.fsb("run", "logs-follow", "--image", demo_image, "--", "sh", "-c", script)
    assert run.returncode == 0, run.stderr
    # Bounded only so a follower that never ends fails the test instead of hanging it.
    followed = server.fsb("logs", "logs-follow", "-f", timeout=90)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == "begin\nbye"
    assert followed.stderr == "end\n"
