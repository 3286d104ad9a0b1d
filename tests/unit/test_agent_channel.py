"""The agent's supervisor channel against a Python supervisor that speaks PROTOCOL.md: the
handshake (and a wrong secret refused), exec with stdin/stdout/stderr/exit, concurrent replies,
single-use stream tokens, file operations and their errors, streamed read/write, watch, a redial
after the agent's listener is re-made, and the bounded wait for a supervisor that never dials."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fastsandbox.agent.supervisor import ChannelHub, Output, SupervisorClient
from fastsandbox.agent.supervisor import channel as channel_mod
from fastsandbox.agent.supervisor.errors import translate
from fastsandbox.agent.supervisor.frames import encode_json, read_frame
from fastsandbox.errors import (
    FailedPrecondition,
    FsbError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RuntimeFailure,
    Unavailable,
)
from tests.unit.fake_supervisor import FakeSupervisor

SID = "sb-1"


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[ChannelHub]:
    # A deep state dir: the socket is bound through /proc/self/fd, so sun_path's limit is moot.
    state = tmp_path / ("deep-" * 20) / "state"
    h = ChannelHub(state)
    yield h
    await h.close()


@pytest.fixture
async def sup(hub: ChannelHub, tmp_path: Path) -> AsyncIterator[FakeSupervisor]:
    await hub.open(SID)
    root = tmp_path / "root"
    (root / "tmp").mkdir(parents=True)
    env = dict(hub.supervisor_env(SID))
    s = FakeSupervisor(hub.directory(SID), SID, env["FSB_SUPERVISOR_SECRET"], root)
    s.start()
    yield s
    await s.stop()


def client(hub: ChannelHub) -> SupervisorClient:
    c = hub.client(SID)
    assert c is not None
    return c


async def test_key_is_owner_only_and_secret_stable(hub: ChannelHub) -> None:
    env = dict(hub.supervisor_env(SID))
    assert env["FSB_CHANNEL"] == "/.fsb/run" and env["FSB_SANDBOX_ID"] == SID
    assert len(env["FSB_SUPERVISOR_SECRET"]) == 64
    key_file = hub.state_dir / "supervisor.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    again = ChannelHub(hub.state_dir)
    assert dict(again.supervisor_env(SID)) == env
    assert (
        dict(again.supervisor_env("sb-2"))["FSB_SUPERVISOR_SECRET"] != env["FSB_SUPERVISOR_SECRET"]
    )
    await hub.open(SID)
    assert len(str(hub.directory(SID) / "agent.sock")) > 108
    assert (hub.directory(SID) / "agent.sock").stat().st_mode & 0o777 == 0o600


async def test_exec_streams_and_exit_code(sup: FakeSupervisor, hub: ChannelHub) -> None:
    p = await client(hub).exec(["sh", "-c", "cat; echo err >&2; exit 3"], stdin=True, env=["A=1"])
    assert p.pid > 0
    await p.write_stdin(b"hello ")
    await p.write_stdin(b"world\n")
    await p.close_stdin()
    out: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    events = [e async for e in p.events()]
    for e in events:
        if isinstance(e, Output):
            out[e.stream] += e.data
    assert out == {"stdout": b"hello world\n", "stderr": b"err\n"}
    assert p.status is not None and p.status.code == 3 and p.status.signal is None
    assert events[-1] == p.status


async def test_signal_and_concurrent_replies(sup: FakeSupervisor, hub: ChannelHub) -> None:
    c = client(hub)
    slow = await c.exec(["sleep", "30"])
    # Requests issued together are answered independently.
    entries, procs = await asyncio.gather(c.list("/"), c.ps())
    assert [e.name for e in entries] == ["tmp"]
    assert slow.pid in {p.pid for p in procs if p.running}
    await slow.signal(signal.SIGTERM)
    status = await slow.wait()
    assert status.signal == signal.SIGTERM and status.code == 128 + signal.SIGTERM


async def test_detach_and_attach_replays(sup: FakeSupervisor, hub: ChannelHub) -> None:
    c = client(hub)
    p = await c.exec(["sh", "-c", "echo one; read x; echo two"], stdin=True)
    assert await p.stdout().__anext__() == b"one\n"
    await p.close()  # detach; the process keeps running
    again = await c.attach(p.pid)
    await again.write_stdin(b"go\n")
    data = b"".join([chunk async for chunk in again.stdout()])
    assert data == b"two\n"
    with pytest.raises(NotFound, match="No such process"):
        await c.attach(999_999)


async def test_file_errors_name_the_path(sup: FakeSupervisor, hub: ChannelHub) -> None:
    c = client(hub)
    with pytest.raises(NotFound, match="/tmp/nope"):
        await c.stat("/tmp/nope")
    assert await c.mkdir("/tmp/d/e") is True
    assert await c.mkdir("/tmp/d/e") is False
    with pytest.raises(FailedPrecondition, match="/tmp/d"):
        await c.read("/tmp/d")
    with pytest.raises(FailedPrecondition, match="/tmp/d"):
        await c.write("/tmp/d", _chunks([b"x"]))
    moved = await c.move("/tmp/d", "/tmp/f")
    assert moved.type == "dir" and moved.path == "/tmp/f"
    assert [e.path for e in await c.list("/tmp", depth=2)] == ["/tmp/f", "/tmp/f/e"]
    await c.remove("/tmp/f")
    with pytest.raises(NotFound, match="/tmp/f"):
        await c.remove("/tmp/f")
    e = await c.write("/tmp/m", _chunks([b"abc"]), mode=0o600, mtime=1_000_000.0)
    e = await c.setattr("/tmp/m", mode=0o640)
    assert (e.mode, e.mtime, e.size) == (0o640, 1_000_000.0, 3)


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


async def test_stream_write_read_big(sup: FakeSupervisor, hub: ChannelHub) -> None:
    c = client(hub)
    block = os.urandom(1 << 20)
    want = hashlib.sha256(block * 8).hexdigest()

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield block

    entry = await c.write("/tmp/big/file", gen())
    assert entry.size == 8 << 20 and entry.mode == 0o644
    reader = await c.read("/tmp/big/file")
    assert reader.entry.size == 8 << 20
    h = hashlib.sha256()
    async for chunk in reader.chunks():
        assert len(chunk) <= 256 * 1024
        h.update(chunk)
    assert h.hexdigest() == want


async def test_write_cut_off_leaves_old_file(sup: FakeSupervisor, hub: ChannelHub) -> None:
    c = client(hub)
    await c.write("/tmp/keep", _chunks([b"old"]))

    async def failing() -> AsyncIterator[bytes]:
        yield b"new data"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError):
        await c.write("/tmp/keep", failing())
    r = await c.read("/tmp/keep")
    assert b"".join([x async for x in r.chunks()]) == b"old"


async def test_watch(sup: FakeSupervisor, hub: ChannelHub) -> None:
    c = client(hub)
    events = c.watch("/tmp")
    first = asyncio.ensure_future(events.__anext__())
    while not sup.watchers:
        await asyncio.sleep(0.01)
    await c.mkdir("/tmp/w")
    ev = await first
    assert (ev.event, ev.path, ev.type) == ("create", "/tmp/w", "dir")
    await events.aclose()  # type: ignore[attr-defined]


async def test_wrong_secret_refused(hub: ChannelHub, tmp_path: Path) -> None:
    await hub.open(SID)
    bad = FakeSupervisor(hub.directory(SID), SID, "00" * 32, tmp_path)
    bad.start()
    try:
        while bad.refused == 0:
            await asyncio.sleep(0.01)
        assert not hub.get(SID).connected  # type: ignore[union-attr]
    finally:
        await bad.stop()


async def test_unknown_stream_token_refused(sup: FakeSupervisor, hub: ChannelHub) -> None:
    await client(hub).ps()  # connected
    before = sup.refused
    assert await sup._connect("data", "f" * 32) is None
    assert sup.refused == before + 1


async def test_agent_restart_redial(sup: FakeSupervisor, hub: ChannelHub) -> None:
    c = client(hub)
    p = await c.exec(["sh", "-c", "sleep 0.5; echo after"])
    await hub.close()  # the agent goes away; the process keeps running
    await hub.open(SID)  # a new agent re-makes the listener at the same path
    c2 = client(hub)
    again = await c2.attach(p.pid)
    assert b"".join([x async for x in again.stdout()]) == b"after\n"
    assert sup.controls >= 2


async def test_supervisor_that_never_dials(
    hub: ChannelHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    await hub.open(SID)
    monkeypatch.setattr(channel_mod, "CONNECT_WAIT_SECONDS", 0.2)
    with pytest.raises(Unavailable, match=f"sandbox {SID}"):
        await channel_mod.Channel.control(hub.get(SID), wait=0.2)  # type: ignore[arg-type]
    await hub.remove(SID)
    assert not hub.directory(SID).exists()


async def test_malformed_frame_closes_control(hub: ChannelHub) -> None:
    """A peer that does not handshake is dropped without ever counting as connected."""
    await hub.open(SID)
    d = tempfile.mkdtemp(dir="/tmp")
    try:
        link = Path(d) / "s"
        link.symlink_to(hub.directory(SID) / "agent.sock")
        reader, writer = await asyncio.open_unix_connection(str(link))
        assert (await read_frame(reader)) is not None
        writer.write(encode_json({"v": 1, "role": "control", "sandbox": SID}))
        answer = await read_frame(reader)
        assert answer is not None and answer.json()["ok"] is False
        writer.close()
        assert not hub.get(SID).connected  # type: ignore[union-attr]
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("ENOENT", NotFound),
        ("EISDIR", FailedPrecondition),
        ("EACCES", PermissionDenied),
        ("EROFS", PermissionDenied),
        ("EINVAL", InvalidArgument),
        ("EIO", RuntimeFailure),
    ],
)
def test_errno_translation_keeps_the_path(code: str, cls: type[FsbError]) -> None:
    err = translate({"code": code, "message": "open /tmp/x: boom", "path": "/tmp/x"}, SID)
    assert type(err) is cls and "/tmp/x" in err.message
    bare = translate({"code": code, "message": "boom", "path": "/etc/y"}, SID)
    assert "/etc/y" in bare.message
