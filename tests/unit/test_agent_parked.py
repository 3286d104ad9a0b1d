# ruff: noqa: F811  (pytest fixtures imported from supervisor_fixtures are parameters here)
"""The agent's channel (`ChannelHub`) against the real fsb-supervisor binary: after a channel's
first stream, later streams ride parked data connections (PROTOCOL.md `park`), with output,
order and exit codes as a dialled stream has them; `park()` (what a warm slot does before it is
claimed) parks them before any stream, so the first one dials nothing; a supervisor restart (a
new control connection) drops the parked ones and streams still work."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fastsandbox.agent.supervisor import ChannelHub, ExitStatus, Output, SupervisorClient
from fastsandbox.agent.supervisor.channel import SPARES
from tests.unit.supervisor_fixtures import (  # noqa: F401 (fixture)
    SANDBOX_ID,
    start_supervisor,
    stop,
    supervisor_bin,
    wait_until,
)


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[ChannelHub]:
    h = ChannelHub(tmp_path / "state")
    await h.open(SANDBOX_ID)
    yield h
    await h.close()


def _start(hub: ChannelHub, binary: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    secret = dict(hub.supervisor_env(SANDBOX_ID))["FSB_SUPERVISOR_SECRET"]
    return start_supervisor(binary, hub.directory(SANDBOX_ID), secret, tmp_path / "sup.log")


def _counting(client: SupervisorClient) -> list[Any]:
    """Wrap the channel's request to record each streaming reply's `parked`."""
    seen: list[Any] = []
    channel = client.channel
    original = channel.request

    async def request(op: str, **fields: Any) -> dict[str, Any]:
        reply = await original(op, **fields)
        if op == "exec":
            seen.append(reply.get("parked"))
        return reply

    channel.request = request  # type: ignore[method-assign]
    return seen


async def _run(client: SupervisorClient, script: str) -> tuple[list[Output], ExitStatus]:
    process = await client.exec(["sh", "-c", script], env=["PATH=/usr/bin:/bin"])
    outputs: list[Output] = []
    status = None
    async for event in process.events():
        if isinstance(event, ExitStatus):
            status = event
        else:
            outputs.append(event)
    await process.close()
    assert status is not None
    return outputs, status


async def test_later_streams_ride_parked_connections(
    hub: ChannelHub, supervisor_bin: Path, tmp_path: Path
) -> None:
    proc = _start(hub, supervisor_bin, tmp_path)
    try:
        client = hub.client(SANDBOX_ID)
        assert client is not None
        seen = _counting(client)
        for i in range(6):
            outputs, status = await _run(client, f"echo a{i}; echo b{i} >&2; echo c{i}; exit {i}")
            out = b"".join(o.data for o in outputs if o.stream == "stdout")
            err = b"".join(o.data for o in outputs if o.stream == "stderr")
            assert (out, err, status.code) == (f"a{i}\nc{i}\n".encode(), f"b{i}\n".encode(), i)
            # The refill runs after a stream ends: wait for it, so the next one can use it.
            await wait_until(lambda: len(client.channel._spares) >= 1, "a parked connection")
        assert seen[0] is None  # the first stream dials: nothing was parked yet
        assert all(p is True for p in seen[1:]), seen
        # A failed exec leaves its parked connection parked (the supervisor kept it).
        with pytest.raises(Exception, match="nosuch"):
            await client.exec(["/nosuch"], env=[])
        _, status = await _run(client, "exit 7")
        assert status.code == 7 and seen[-1] is True
    finally:
        stop(proc)


async def test_park_before_the_first_stream(
    hub: ChannelHub, supervisor_bin: Path, tmp_path: Path
) -> None:
    proc = _start(hub, supervisor_bin, tmp_path)
    try:
        client = hub.client(SANDBOX_ID)
        assert client is not None
        seen = _counting(client)
        await client.channel.control()
        await client.channel.park()
        assert len(client.channel._spares) == SPARES
        await client.channel.park()  # already full: nothing more is parked
        assert len(client.channel._spares) == SPARES
        outputs, status = await _run(client, "echo first")
        assert status.code == 0
        assert b"".join(o.data for o in outputs if o.stream == "stdout") == b"first\n"
        assert seen == [True]  # the first stream rode a parked connection
    finally:
        stop(proc)


async def test_a_new_control_connection_drops_the_parked_ones(
    hub: ChannelHub, supervisor_bin: Path, tmp_path: Path
) -> None:
    proc = _start(hub, supervisor_bin, tmp_path)
    client = hub.client(SANDBOX_ID)
    assert client is not None
    seen = _counting(client)
    try:
        await _run(client, "true")
        await wait_until(lambda: len(client.channel._spares) >= 1, "a parked connection")
    finally:
        stop(proc)
    old = client.channel._control
    proc = _start(hub, supervisor_bin, tmp_path)  # a new supervisor: a new control connection
    try:
        await wait_until(
            lambda: client.channel.connected and client.channel._control is not old,
            "the new supervisor's control connection",
        )
        _, status = await _run(client, "echo again")
        assert status.code == 0
        assert seen[-1] is None  # the old parked ones were not used (the new one dialled)
    finally:
        stop(proc)
