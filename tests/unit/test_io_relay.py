"""The Fast-Path exec/files relay: requests checked at the edge, relayed to the agent by the
sandbox's id, agent statuses passed through, streams in both directions."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2_grpc, io_pb2
from fastsandbox.api.models import Sandbox, SandboxPhase
from fastsandbox.control.fastpath.io_relay import HUNG_AGENT_SECONDS, IoRelayRpcs, check_start
from fastsandbox.errors import FailedPrecondition, InvalidArgument, NotFound
from fastsandbox.store.memory import MemoryStore
from tests.unit.fastpath_fake import TOKEN, FakeFastPath
from tests.unit.io_fastpath_fake import Rig, serve_io

AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with serve_io(tmp_path) as rig:
        rig.fastpath.add_sandbox("box")
        yield rig


def target(name: str = "box") -> io_pb2.SandboxTarget:
    return io_pb2.SandboxTarget(namespace="default", name=name)


async def _exec(rig: Rig, msgs: list[io_pb2.ExecInput], token: str = TOKEN) -> list[Any]:
    async with grpc.aio.insecure_channel(rig.endpoint) as channel:
        stub = fastpath_pb2_grpc.FastPathStub(channel)

        async def inputs() -> Any:
            for m in msgs:
                yield m

        call = stub.Exec(inputs(), metadata=(("authorization", f"Bearer {token}"),))
        return [out async for out in call]


def start(argv: list[str], **kw: Any) -> io_pb2.ExecInput:
    return io_pb2.ExecInput(start=io_pb2.ExecStart(target=target(), argv=argv, **kw))


async def test_exec_relays_stdin_output_and_exit_code_by_sandbox_id(rig: Rig) -> None:
    outs = await _exec(
        rig,
        [
            start(["sh", "-c", "cat; echo err >&2; exit 7"], stdin=True),
            io_pb2.ExecInput(stdin=b"hello\n"),
            io_pb2.ExecInput(close_stdin=True),
        ],
    )
    kinds = [o.WhichOneof("kind") for o in outs]
    assert kinds[0] == "started" and kinds[-1] == "exited"
    assert b"".join(o.stdout for o in outs) == b"hello\n"
    assert b"".join(o.stderr for o in outs) == b"err\n"
    assert outs[-1].exited.exit_code == 7
    # The agent was asked about the container, not about namespace/name.
    assert rig.agent.sandbox_ids == ["ctr-box"]


@pytest.mark.parametrize(
    ("msgs", "field"),
    [
        ([start([])], "start.argv"),
        ([start(["true"], cwd="tmp")], "start.cwd"),
        ([start(["true"], env=[io_pb2.KeyValuePair(key="A", value="x" * 300_000)])], "start.env"),
        ([start(["true"], env=[io_pb2.KeyValuePair(key="A=B", value="1")])], "start.env[0]"),
        ([start(["true"], timeout_seconds=-1)], "start.timeout_seconds"),
        ([io_pb2.ExecInput(stdin=b"x")], "start"),
        ([], "start"),
    ],
)
async def test_bad_exec_start_is_invalid_argument_naming_the_field(
    rig: Rig, msgs: list[io_pb2.ExecInput], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _exec(rig, msgs)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(field + ":")
    assert rig.agent.sandbox_ids == []  # refused before any agent saw it


async def test_bad_signal_mid_stream_ends_the_call_with_invalid_argument(rig: Rig) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _exec(rig, [start(["sleep", "30"]), io_pb2.ExecInput(signal=999)])
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "signal:" in (info.value.details() or "")


async def test_a_refused_exec_leaves_no_child_once_the_servers_stop(tmp_path: Path) -> None:
    # The refusal reaches the caller before the agent has unwound its handler; stopping the
    # servers must still wait for it (a leftover `sleep 30` was an unraisable ResourceWarning
    # in whichever test ran next).
    with serve_io(tmp_path) as rig:
        rig.fastpath.add_sandbox("box")
        async with grpc.aio.insecure_channel(rig.endpoint) as channel:
            call = fastpath_pb2_grpc.FastPathStub(channel).Exec(metadata=AUTH)
            await call.write(start(["sleep", "30"]))
            assert (await call.read()).WhichOneof("kind") == "started"  # the child runs
            await call.write(io_pb2.ExecInput(signal=999))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert rig.agent.pids
    for pid in rig.agent.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_streams_to_an_agent_that_stops_answering_heartbeats_end_unavailable(
    rig: Rig,
) -> None:
    # As heartbeats would see it: unready for longer than the relay waits. The exec's child
    # and the upload both still hang at the agent; the relay's watchdog ends the calls.
    rig.fastpath.unready_since = time.monotonic() - HUNG_AGENT_SECONDS
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _exec(rig, [start(["sleep", "30"])])
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "has not answered heartbeats" in (info.value.details() or "")

    async def never_ending_upload() -> Any:
        yield io_pb2.WriteFileInput(header=io_pb2.WriteFileHeader(target=target(), path="/tmp/u"))
        await asyncio.Event().wait()
        yield io_pb2.WriteFileInput()  # pragma: no cover - never reached

    async with grpc.aio.insecure_channel(rig.endpoint) as channel:
        stub = fastpath_pb2_grpc.FastPathStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.WriteFile(never_ending_upload(), metadata=AUTH)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_exec_into_a_sandbox_not_running_names_its_phase(rig: Rig) -> None:
    rig.fastpath.add_sandbox("pending").status.phase = SandboxPhase.PENDING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _exec(
            rig, [io_pb2.ExecInput(start=io_pb2.ExecStart(target=target("pending"), argv=["true"]))]
        )
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "Pending" in (info.value.details() or "")


async def test_exec_into_an_unknown_sandbox_is_not_found(rig: Rig) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _exec(
            rig, [io_pb2.ExecInput(start=io_pb2.ExecStart(target=target("nope"), argv=["true"]))]
        )
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_the_relay_rpcs_need_the_token(rig: Rig) -> None:
    # Unary and server-streaming calls: a client-streaming call may lose the race between its
    # first send and the refusal (grpc then reports its own INTERNAL), which says nothing here.
    bad = (("authorization", "Bearer wrong"),)
    async with grpc.aio.insecure_channel(rig.endpoint) as channel:
        stub = fastpath_pb2_grpc.FastPathStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FileOp(
                io_pb2.FileOpRequest(target=target(), op="stat", path="/tmp"), metadata=bad
            )
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            call = stub.ReadFile(io_pb2.ReadFileRequest(target=target(), path="/x"), metadata=bad)
            [c async for c in call]
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert rig.agent.sandbox_ids == []


async def test_files_round_trip_and_agent_statuses_pass_through(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.endpoint) as channel:
        stub = fastpath_pb2_grpc.FastPathStub(channel)
        blob = bytes(range(256)) * 4096  # 1 MiB: several chunks each way

        async def chunks() -> Any:
            yield io_pb2.WriteFileInput(
                header=io_pb2.WriteFileHeader(
                    target=target(), path="/tmp/d/blob", parents=True, mode=0o600
                )
            )
            for i in range(0, len(blob), 100_000):
                yield io_pb2.WriteFileInput(data=blob[i : i + 100_000])

        reply = await stub.WriteFile(chunks(), metadata=AUTH)
        assert reply.entry.size == len(blob) and reply.entry.mode == 0o600
        got = [
            c
            async for c in stub.ReadFile(
                io_pb2.ReadFileRequest(target=target(), path="/tmp/d/blob"), metadata=AUTH
            )
        ]
        assert b"".join(c.data for c in got) == blob
        assert got[0].entry.size == len(blob)
        listing = await stub.FileOp(
            io_pb2.FileOpRequest(target=target(), op="list", path="/tmp/d"), metadata=AUTH
        )
        assert [e.name for e in listing.entries] == ["blob"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FileOp(
                io_pb2.FileOpRequest(target=target(), op="stat", path="/tmp/missing"), metadata=AUTH
            )
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert "/tmp/missing" in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FileOp(
                io_pb2.FileOpRequest(target=target(), op="stat", path="relative"), metadata=AUTH
            )
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("path:")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FileOp(
                io_pb2.FileOpRequest(target=target(), op="chmod", path="/tmp"), metadata=AUTH
            )
        assert (info.value.details() or "").startswith("op:")
        procs = await stub.ListProcesses(io_pb2.ProcessesRequest(target=target()), metadata=AUTH)
        assert procs.processes[0].main


async def test_the_real_lookup_checks_phase_and_agent() -> None:
    store = MemoryStore()
    fake = FakeFastPath()
    sb = fake.add_sandbox("box")
    await store.create(sb)
    registry = SimpleNamespace(get_agent=lambda name: None)
    relay = IoRelayRpcs()
    # The relay reads through `SandboxService.get` (records not yet stored are served from
    # memory in Fast mode); here the store alone answers.
    relay.sandboxes = SimpleNamespace(  # type: ignore[assignment]
        get=lambda ns, name: store.get(Sandbox, ns, name), registry=registry, agents=None
    )
    with pytest.raises(NotFound, match="not connected"):
        await relay._agent_for(target())
    with pytest.raises(NotFound):
        await relay._agent_for(target("other"))
    with pytest.raises(InvalidArgument, match=r"target\.name"):
        await relay._agent_for(io_pb2.SandboxTarget())
    sb2 = fake.add_sandbox("idle")
    sb2.status.phase = SandboxPhase.SUCCEEDED
    await store.create(sb2)
    with pytest.raises(FailedPrecondition, match="Succeeded, not Running"):
        await relay._agent_for(target("idle"))


def test_check_start_accepts_a_normal_command() -> None:
    check_start(
        io_pb2.ExecStart(
            argv=["ls", "-l"], cwd="/tmp", env=[io_pb2.KeyValuePair(key="A", value="1")]
        )
    )
