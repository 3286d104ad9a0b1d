"""The janitor in a real `fsb server`: a container with our labels that no record points at is
removed after the orphan timeout; a live sandbox made by `fsb run` is never touched."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e._server import Server, new_server, purge

pytestmark = pytest.mark.e2e

FIFO_DIR = Path("/run/containerd/fifo")


@pytest.fixture(scope="module")
def server(registry_addr: str) -> Iterator[Server]:
    srv = new_server(registry_addr, "--orphan-timeout", "2", "--janitor-interval", "1")
    try:
        srv.start()
        yield srv
    finally:
        purge(srv)


def fifos_of(cid: str) -> list[Path]:
    """`ctr run -d` leaves its task's FIFOs in the client's FIFO dir after it detaches."""
    return sorted(FIFO_DIR.glob(f"*/{cid}-*"))


def test_an_orphan_is_removed_and_a_live_sandbox_is_not(server: Server, demo_image: str) -> None:
    started = time.monotonic()
    orphan = f"orphan-{secrets.token_hex(4)}"
    result = server.fsb("run", "keeper", "--image", demo_image, "--", "sleep", "3600")
    assert result.returncode == 0, result.stderr
    try:
        status = server.fsb_json("get", "keeper")["status"]
        agent, live_id = status["assignedAgent"], status["containerID"]
        assert live_id in server.running_tasks()

        # A Fast-mode create whose server died before the record was written looks like this:
        # a running container with our labels for a live agent, and no record.
        server.ctr(
            "run",
            "-d",
            "--label",
            "fastsandbox.io/managed=true",
            "--label",
            f"fastsandbox.io/agent={agent}",
            "--label",
            f"fastsandbox.io/sandbox-id={orphan}",
            demo_image,
            orphan,
            "sleep",
            "3600",
        )
        assert orphan in server.running_tasks()
        assert fifos_of(orphan), "ctr made no FIFOs: the FIFO sweep goes untested"

        deadline = time.monotonic() + 15
        while orphan in server.containers():
            assert time.monotonic() < deadline, "orphan container not removed within 15 s"
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while orphan in server.snapshots() or fifos_of(orphan):
            assert time.monotonic() < deadline, "orphan's snapshot or FIFOs left behind"
            time.sleep(0.2)

        # The live sandbox has lived through ten seconds of janitor scans untouched.
        while time.monotonic() - started < 10:
            time.sleep(0.5)
        assert live_id in server.running_tasks()
        assert live_id in server.containers()
        got = server.fsb_json("get", "keeper")["status"]
        assert got["phase"] == "Running"
        assert got["containerID"] == live_id
    finally:
        server.fsb("delete", "keeper", "--wait")
        for path in fifos_of(orphan):
            path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()
