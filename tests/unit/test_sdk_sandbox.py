"""The E2B-shaped SDK (`Sandbox`, `AsyncSandbox`) against the real relay and a fake agent that
runs real processes: results, callbacks, timeouts, background handles, PTYs and files."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

import fastsandbox
from fastsandbox import (
    AsyncSandbox,
    Client,
    CommandTimeout,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Sandbox,
)
from fastsandbox.api.models import SandboxPhase
from fastsandbox.errors import CommandFailed
from tests.unit.fastpath_fake import TOKEN, isolate_env
from tests.unit.io_fastpath_fake import Rig, serve_io


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_env(monkeypatch, tmp_path)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with serve_io(tmp_path) as rig:
        yield rig


def test_top_level_names_are_the_sdk_and_the_error_tree() -> None:
    assert fastsandbox.Sandbox is Sandbox
    assert fastsandbox.NotFound is NotFound
    assert issubclass(fastsandbox.CommandTimeout, fastsandbox.FsbError)
    with pytest.raises(AttributeError):
        _ = fastsandbox.Nope  # type: ignore[attr-defined]


def test_the_issue_example_sync(rig: Rig) -> None:
    seen: list[str] = []
    with Sandbox.create(
        image="busybox",
        name=None,
        pool="default-pool",
        command=None,
        env={"A": "1"},
        workdir="/tmp",
        ports=[8080],
        ttl=600,
        lease=None,
        mode="fast",
        endpoint=rig.endpoint,
        token=TOKEN,
    ) as sb:
        assert sb.name.startswith("sb-") and sb.id == f"uid-{sb.name}"
        r = sb.commands.run("echo hi; exit 3", timeout=30)
        assert (r.exit_code, r.stdout, r.stderr) == (3, "hi\n", "")
        with pytest.raises(CommandFailed) as failed:
            r.check()
        assert failed.value.exit_code == 3
        sb.commands.run("echo out; echo err >&2", on_stdout=seen.append, on_stderr=seen.append)
        assert sorted(seen) == ["err\n", "out\n"]
        h = sb.commands.run("sleep 5", background=True)
        assert h.kill() is True
        assert h.wait().exit_code == 137
        t = sb.pty.create(cols=80, rows=24, cmd=["sh"])
        t.send(b"stty size\n")
        t.wait_for_output(b"24 80")
        t.resize(100, 30)
        t.send(b"stty size; exit\n")
        assert b"30 100" in t.wait_for_output(b"30 100")
        assert t.wait() == 0
        sb.files.write("/tmp/x.txt", "data")
        assert sb.files.read("/tmp/x.txt") == b"data"
        assert [e.name for e in sb.files.list("/tmp")] == ["x.txt"]
        sb.files.remove("/tmp/x.txt")
        assert not sb.files.exists("/tmp/x.txt")
        assert b"hello" in b"".join(sb.logs(follow=False))
        sb.set_timeout(120)
        assert sb.endpoints == ("10.88.0.2:8080",)
        assert sb.timings is not None and sb.timings.runtime_ready_ms == 42.0
        name = sb.name
        again = Sandbox.connect(name, endpoint=rig.endpoint, token=TOKEN)
        assert again.commands.run(["echo", "x"]).stdout == "x\n"
        again.close()
        listed = Client(endpoint=rig.endpoint, token=TOKEN)
        assert [(s.name, s.phase) for s in listed.list()] == [(name, "Running")]
        listed.close()
    assert ("default", name) not in rig.fastpath.sandboxes


async def test_the_issue_example_async(rig: Rig) -> None:
    async with await AsyncSandbox.create(
        image="busybox", env={"A": "1"}, endpoint=rig.endpoint, token=TOKEN
    ) as sb:
        r = await sb.commands.run("echo $A; exit 3", envs={"A": "2"})
        assert (r.exit_code, r.stdout) == (3, "2\n")
        got: list[str] = []

        async def collect(text: str) -> None:
            got.append(text)

        await sb.commands.run("printf 'a\\nb\\n'", on_stdout=collect)
        assert "".join(got) == "a\nb\n"
        h = await sb.commands.run("read x; echo got $x", background=True, stdin=True)
        await h.send_stdin("it\n")
        assert (await h.wait()).stdout == "got it\n"
        await sb.files.write("/tmp/big.bin", io.BytesIO(b"z" * 3_000_000), mode=0o640, mtime=1e9)
        info = await sb.files.stat("/tmp/big.bin")
        assert (info.size, info.mode, info.mtime) == (3_000_000, 0o640, 1e9)
        assert sum([len(c) async for c in sb.files.read_stream("/tmp/big.bin")]) == 3_000_000
        assert await sb.files.mkdir("/tmp/a/b") is True
        await sb.files.move("/tmp/big.bin", "/tmp/a/b/moved")
        assert [e.path for e in await sb.files.list("/tmp/a", depth=3)] == [
            "/tmp/a/b",
            "/tmp/a/b/moved",
        ]
        t = await sb.pty.create(cols=40, rows=10, cmd=["sh", "-c", "tty"])
        assert await t.wait() == 0
        assert b"/dev/" in t.output


def test_timeout_kills_the_command_and_raises(rig: Rig) -> None:
    with Sandbox.create("busybox", endpoint=rig.endpoint, token=TOKEN) as sb:
        with pytest.raises(CommandTimeout, match=r"timed out after 0\.5s"):
            sb.commands.run("sleep 30", timeout=0.5)
        # The sandbox is still usable afterwards.
        assert sb.commands.run("true").exit_code == 0


def test_errors_are_the_error_tree(rig: Rig) -> None:
    with Sandbox.create("busybox", endpoint=rig.endpoint, token=TOKEN) as sb:
        with pytest.raises(NotFound, match="/tmp/missing"):
            sb.files.read("/tmp/missing")
        with pytest.raises(InvalidArgument, match="path"):
            sb.files.read("relative/path")
        with pytest.raises(InvalidArgument, match=r"start\.argv"):
            sb.commands.run([])
        rig.fastpath.sandboxes[("default", sb.name)].status.phase = SandboxPhase.FAILED
        with pytest.raises(FailedPrecondition, match="Failed, not Running"):
            sb.commands.run("true")
    with pytest.raises(NotFound):
        Sandbox.connect("nope", endpoint=rig.endpoint, token=TOKEN)


def test_lease_is_sent_and_unimplemented_renewal_is_survived(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    with Sandbox.create("busybox", lease=2, endpoint=rig.endpoint, token=TOKEN) as sb:
        create = next(c for c in rig.fastpath.calls if c.method == "Create")
        assert create.request.lease_seconds == 2
        # The fake serves no RenewLease: the renewer says so once and stops; work goes on.
        for _ in range(50):
            if "does not renew leases" in caplog.text:
                break
            sb.commands.run("sleep 0.05")
        assert "does not renew leases" in caplog.text
    with pytest.raises(InvalidArgument, match="lease"):
        Sandbox.create("busybox", lease=1, endpoint=rig.endpoint, token=TOKEN)


def test_a_lease_is_renewed_in_the_background_until_the_sandbox_is_gone(rig: Rig) -> None:
    rig.fastpath.serve_leases = True
    with Sandbox.create("busybox", lease=2, endpoint=rig.endpoint, token=TOKEN) as sb:
        for _ in range(100):  # bounded wait for two renewals (every lease/3 s), not a timing
            if len(rig.fastpath.renewals) >= 2:
                break
            sb.commands.run("sleep 0.05")
        assert rig.fastpath.renewals[:2] == [sb.name, sb.name]
    seen = len(rig.fastpath.renewals)
    time_passes = Sandbox.create("busybox", endpoint=rig.endpoint, token=TOKEN)
    for _ in range(30):
        time_passes.commands.run("sleep 0.05")
    time_passes.kill()
    time_passes.close()
    assert len(rig.fastpath.renewals) == seen  # the renewer stopped with its sandbox
