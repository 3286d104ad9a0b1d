"""Events: the recorder (never blocks or fails its caller), what the control plane records over a
sandbox's life (over the same fakes as test_lifecycle), the Fast-Path `ListEvents`, the SDK's
`events()` and `fsb describe` (rendered text, `-o json|yaml`, exit codes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from typer.testing import CliRunner

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc
from fastsandbox.api.models import Event, ObjectMeta, Sandbox, SandboxPhase, SandboxSpec
from fastsandbox.cli.commands.describe import describe_text
from fastsandbox.cli.main import app
from fastsandbox.control.events import EventRecorder
from fastsandbox.control.fastpath.auth import TokenAuth
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.errors import NotFound, Unavailable
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.sdk import Client, InvalidArgument
from fastsandbox.store.memory import MemoryStore
from tests.unit.fastpath_fake import CREATED, TOKEN, FakeFastPath, isolate_env, serve
from tests.unit.test_control_plane import TOKEN as PLANE_TOKEN
from tests.unit.test_control_plane import Plane, auth, eventually, free_port, make_pool

P = SandboxPhase
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def sandbox(name: str = "s") -> Sandbox:
    return Sandbox(
        metadata=ObjectMeta(name=name),
        spec=SandboxSpec(image="busybox", pool_ref="p"),
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


# ------------------------------------------------------------------ the recorder


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    opened = MemoryStore()
    yield opened
    await opened.close()


async def test_recorded_events_reach_the_store_in_order(store: MemoryStore) -> None:
    sb = await store.create(sandbox())
    recorder = EventRecorder(store, clock=Clock())
    recorder.record(sb, "Scheduled", "on a1")
    recorder.record(sb, "Started", "c1")
    recorder.warning(sb, "Exited", "code 3")
    await recorder.flush()
    got = await store.list_events("Sandbox", "default", "s")
    assert [(e.type, e.reason, e.message) for e in got] == [
        ("Normal", "Scheduled", "on a1"),
        ("Normal", "Started", "c1"),
        ("Warning", "Exited", "code 3"),
    ]
    assert got[0].uid == sb.metadata.uid
    assert [e.timestamp for e in got] == [T0 + timedelta(seconds=i) for i in (1, 2, 3)]


async def test_repeats_are_counted_into_one_event(store: MemoryStore) -> None:
    sb = await store.create(sandbox())
    recorder = EventRecorder(store, clock=Clock())
    for _ in range(5):
        recorder.warning(sb, "Unschedulable", "no free slot")
    await recorder.flush()
    for _ in range(2):  # after the first ones were written: merged by the store
        recorder.warning(sb, "Unschedulable", "no free slot")
    await recorder.flush()
    [got] = await store.list_events("Sandbox", "default", "s")
    assert got.count == 7
    assert got.timestamp == T0 + timedelta(seconds=7)


async def test_record_never_blocks_and_a_full_queue_drops_the_oldest(store: MemoryStore) -> None:
    sb = await store.create(sandbox())
    recorder = EventRecorder(store, queue_size=3)
    for i in range(10):  # no await in between: the drain has not run yet
        recorder.record(sb, "Step", f"#{i}")
    assert recorder.dropped == 7
    await recorder.flush()
    got = await store.list_events("Sandbox", "default", "s")
    assert [e.message for e in got] == ["#7", "#8", "#9"]


@dataclass
class BrokenStore:
    """A store whose event writes fail (`fail` times), or hang until released."""

    inner: MemoryStore
    fail: int = 0
    hang: asyncio.Event | None = None
    seen: list[Event] = field(default_factory=list)

    async def record_event(self, event: Event) -> None:
        self.seen.append(event)
        if self.hang is not None:
            await self.hang.wait()
        if self.fail:
            self.fail -= 1
            raise Unavailable("the state database is locked")
        await self.inner.record_event(event)


async def test_a_failing_store_never_reaches_the_caller(store: MemoryStore) -> None:
    sb = await store.create(sandbox())
    broken = BrokenStore(store, fail=2)
    recorder = EventRecorder(broken)  # type: ignore[arg-type]
    recorder.record(sb, "A")
    recorder.record(sb, "B")
    recorder.record(sb, "C")
    await recorder.flush()
    assert recorder.failed_writes == 2
    assert [e.reason for e in await store.list_events("Sandbox", "default", "s")] == ["C"]


async def test_a_hung_store_does_not_block_record_and_close_gives_up(
    store: MemoryStore,
) -> None:
    sb = await store.create(sandbox())
    hung = BrokenStore(store, hang=asyncio.Event())
    recorder = EventRecorder(hung)  # type: ignore[arg-type]
    recorder.record(sb, "A")
    await asyncio.sleep(0)  # the drain starts and hangs in the store
    for i in range(100):
        recorder.record(sb, "B", f"#{i}")  # synchronous: returns although the store hangs
    await recorder.close(timeout=0.1)
    recorder.record(sb, "after close")
    await recorder.flush()
    assert [e.reason for e in hung.seen] == ["A"]
    assert await store.list_events("Sandbox", "default", "s") == []


@dataclass
class BatchSpy:
    """A store that takes batches (`EventBatches`) and says how it was called."""

    inner: MemoryStore
    calls: list[int] = field(default_factory=list)

    async def record_event(self, event: Event) -> None:
        self.calls.append(1)
        await self.inner.record_event(event)

    async def record_events(self, events: list[Event]) -> None:
        self.calls.append(len(events))
        await self.inner.record_events(events)


async def test_a_burst_reaches_a_batch_store_in_one_write(store: MemoryStore) -> None:
    made = [await store.create(sandbox(f"b{i}")) for i in range(50)]
    spy = BatchSpy(store)
    recorder = EventRecorder(spy)  # type: ignore[arg-type]
    for sb in made:
        recorder.record(sb, "Scheduled")
        recorder.record(sb, "Started")
    await recorder.flush()
    assert spy.calls == [100]
    for sb in made:
        got = await store.list_events("Sandbox", "default", sb.metadata.name)
        assert [e.reason for e in got] == ["Scheduled", "Started"]


async def test_close_writes_what_is_queued(store: MemoryStore) -> None:
    sb = await store.create(sandbox())
    recorder = EventRecorder(store)
    recorder.record(sb, "A")
    recorder.record(sb, "B")
    await recorder.close()
    assert [e.reason for e in await store.list_events("Sandbox", "default", "s")] == ["A", "B"]


# ------------------------------------------------------------------ the control plane


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    store = MemoryStore(bookmark_interval=0.5)
    await make_pool(store, "p", agents=2, per_agent=2)
    fleet = InProcessFleet(tmp_path)
    cp = ControlPlane(
        store,
        fleet,
        PlaneSettings(
            delete_grace_seconds=0, heartbeat_seconds=0.1, expired_retention_seconds=3600
        ),
    )
    await cp.start()
    server = grpc.aio.server(interceptors=[TokenAuth(PLANE_TOKEN)])
    fastpath_pb2_grpc.add_FastPathServicer_to_server(cp.servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Plane(cp, store, fleet, fastpath_pb2_grpc.FastPathStub(channel), channel)  # type: ignore[no-untyped-call]
    finally:
        await channel.close()
        await server.stop(0)
        await cp.close()
        await store.close()


async def events_of(plane: Plane, name: str) -> list[Event]:
    """Through the Fast-Path, as `fsb describe` gets them."""
    await plane.plane.sandboxes.events.flush()
    reply = await plane.stub.ListEvents(fastpath_pb2.EventsRequest(name=name), metadata=auth())
    return [Event.model_validate_json(text) for text in reply.events_json]


async def reasons(plane: Plane, name: str) -> list[str]:
    return [e.reason for e in await events_of(plane, name)]


def has(*wanted: str) -> Any:
    """A check for `eventually`: the reasons recorded so far contain `wanted` in this order."""

    async def check(plane: Plane, name: str) -> bool:
        got = await reasons(plane, name)
        it = iter(got)
        return all(any(r == w for r in it) for w in wanted)

    return check


async def wait_events(plane: Plane, name: str, *wanted: str, timeout: float = 5.0) -> list[str]:
    check = has(*wanted)
    await eventually(lambda: check(plane, name), timeout=timeout)
    return await reasons(plane, name)


async def test_create_and_exit_are_recorded(plane: Plane) -> None:
    reply = await plane.create("ex")
    # Fast: the record (and then its events) is stored just after the answer.
    await wait_events(plane, "ex", "Scheduled", "Started")
    got = await events_of(plane, "ex")
    assert [e.reason for e in got] == ["Scheduled", "Started"]
    assert reply.agent in got[0].message and reply.container_id in got[1].message
    assert all(e.uid == reply.uid and e.type == "Normal" for e in got)

    plane.fleet.runtime(reply.agent).exit(reply.container_id, 3)
    await wait_events(plane, "ex", "Scheduled", "Started", "Exited")
    exited = (await events_of(plane, "ex"))[-1]
    assert exited.type == "Warning"
    assert "code 3 (Error)" in exited.message


async def test_strong_create_is_recorded_too(plane: Plane) -> None:
    await plane.create("strong", mode="strong")
    assert await reasons(plane, "strong") == ["Scheduled", "Started"]


async def test_expiry_is_recorded(plane: Plane) -> None:
    reply = await plane.create("ttl", ttl_seconds=1)
    got = await wait_events(plane, "ttl", "Started", "Expired", timeout=4)
    assert got == ["Scheduled", "Started", "Expired"]
    expired = (await events_of(plane, "ttl"))[-1]
    assert reply.container_id in expired.message and "expireTime" in expired.message


async def test_reset_is_recorded_before_the_new_start(plane: Plane) -> None:
    first = await plane.create("rs")
    await plane.stub.Reset(fastpath_pb2.ObjectRef(name="rs"), metadata=auth())
    got = await wait_events(plane, "rs", "Started", "Reset", "Scheduled", "Started")
    assert got == ["Scheduled", "Started", "Reset", "Scheduled", "Started"]
    reset = (await events_of(plane, "rs"))[2]
    assert first.container_id in reset.message


async def test_update_is_recorded(plane: Plane) -> None:
    await plane.create("up")
    await plane.stub.Update(
        fastpath_pb2.UpdateRequest(
            name="up", labels={"team": "ml"}, failure_policy="AutoRecreate", clear_expiry=True
        ),
        metadata=auth(),
    )
    updated = (await events_of(plane, "up"))[-1]
    assert updated.reason == "Updated"
    assert "team=ml" in updated.message and "AutoRecreate" in updated.message
    assert "never expires" in updated.message


async def test_agent_loss_with_auto_recreate_is_recorded(plane: Plane) -> None:
    reply = await plane.create("auto", failure_policy="AutoRecreate", recovery_timeout_seconds=1)
    await plane.fleet.kill(reply.agent)
    got = await wait_events(
        plane, "auto", "AgentUnreachable", "AgentLost", "Rescheduled", "Scheduled", "Started"
    )
    assert got == [
        "Scheduled",
        "Started",
        "AgentUnreachable",
        "AgentLost",
        "Rescheduled",
        "Scheduled",
        "Started",
    ]
    events = await events_of(plane, "auto")
    assert [e.type for e in events[2:5]] == ["Warning", "Warning", "Normal"]
    assert reply.agent in events[4].message and reply.container_id in events[4].message


async def test_agent_loss_with_manual_is_recorded_and_so_is_the_return(plane: Plane) -> None:
    reply = await plane.create("man", failure_policy="Manual", recovery_timeout_seconds=1)
    await plane.fleet.kill(reply.agent)
    await wait_events(plane, "man", "AgentUnreachable", "AgentLost")
    lost = (await events_of(plane, "man"))[-1]
    assert "Manual" in lost.message
    await plane.fleet.start()  # the agent comes back
    got = await wait_events(plane, "man", "AgentLost", "AgentReturned")
    assert got == ["Scheduled", "Started", "AgentUnreachable", "AgentLost", "AgentReturned"]


async def test_delete_while_the_agent_is_down_is_recorded(plane: Plane) -> None:
    reply = await plane.create("dd", recovery_timeout_seconds=30)
    await plane.fleet.kill(reply.agent)

    async def unready() -> bool:
        agent = plane.plane.registry.get_agent(reply.agent)
        return agent is not None and not agent.ready

    await eventually(unready, timeout=30)
    await plane.stub.Delete(fastpath_pb2.DeleteRequest(name="dd"), metadata=auth())
    got = await wait_events(plane, "dd", "Deleting", "DeletePending")
    assert got[:2] == ["Scheduled", "Started"]
    deleting = next(e for e in await events_of(plane, "dd") if e.reason == "Deleting")
    assert reply.container_id in deleting.message


async def test_unschedulable_retries_are_one_counted_event(plane: Plane) -> None:
    for i in range(4):  # 2 agents x 2: the pool is full
        await plane.create(f"full-{i}")
    pending = sandbox("waiting")
    await plane.store.create(pending)  # declarative: the reconciler keeps trying

    async def counted() -> bool:
        got = await events_of(plane, "waiting")
        return len(got) == 1 and got[0].reason == "Unschedulable" and got[0].count >= 2

    await eventually(counted, timeout=30)
    [event] = await events_of(plane, "waiting")
    assert event.type == "Warning"


async def test_events_of_a_deleted_sandbox_are_gone(plane: Plane) -> None:
    await plane.create("bye")
    await plane.stub.Delete(fastpath_pb2.DeleteRequest(name="bye", wait=True), metadata=auth())
    await plane.create("bye")
    assert await reasons(plane, "bye") == ["Scheduled", "Started"]


async def test_a_record_rebuilt_by_recovery_says_so(plane: Plane) -> None:
    # A Fast create that died between the agent's create and the record's write.
    service = plane.plane.sandboxes
    sb = Sandbox(
        metadata=ObjectMeta(name="crashed", uid="u-1"),
        spec=SandboxSpec(image="127.0.0.1:5000/busybox:latest", pool_ref="p"),
    )
    allocation = service._allocate(sb)
    await service._run_on_agent(sb, allocation)
    fresh = ControlPlane(plane.store, plane.fleet, PlaneSettings(heartbeat_seconds=0.1))
    await fresh.start()
    try:
        await fresh.sandboxes.events.flush()
        [event] = await plane.store.list_events("Sandbox", "default", "crashed")
        assert (event.type, event.reason, event.uid) == ("Warning", "Recovered", "u-1")
        assert allocation.sandbox_id in event.message
    finally:
        # Not `fresh.close()`: the fleet is the fixture's plane's too.
        await fresh.stop_leading()
        await fresh._tasks.close()
        await fresh.sandboxes.events.close()


async def test_list_events_errors(plane: Plane) -> None:
    missing = plane.stub.ListEvents(fastpath_pb2.EventsRequest(name="nope"), metadata=auth())
    assert await plane.code_of(missing) is grpc.StatusCode.NOT_FOUND
    bad = plane.stub.ListEvents(fastpath_pb2.EventsRequest(name="p", kind="Pod"), metadata=auth())
    assert await plane.code_of(bad) is grpc.StatusCode.INVALID_ARGUMENT
    pool = await plane.stub.ListEvents(
        fastpath_pb2.EventsRequest(name="p", kind="SandboxPool"), metadata=auth()
    )
    assert list(pool.events_json) == []
    unauthenticated = plane.stub.ListEvents(fastpath_pb2.EventsRequest(name="p"))
    assert await plane.code_of(unauthenticated) is grpc.StatusCode.UNAUTHENTICATED


async def test_limit_returns_the_most_recent(plane: Plane) -> None:
    reply = await plane.create("lim")
    plane.fleet.runtime(reply.agent).exit(reply.container_id, 0)
    await wait_events(plane, "lim", "Exited")
    got = await plane.stub.ListEvents(
        fastpath_pb2.EventsRequest(name="lim", limit=2), metadata=auth()
    )
    assert [Event.model_validate_json(t).reason for t in got.events_json] == ["Started", "Exited"]


# ------------------------------------------------------------------ SDK and CLI


@dataclass
class FakeWithEvents(FakeFastPath):
    events: dict[tuple[str, str], list[Event]] = field(default_factory=dict)

    async def ListEvents(self, request: Any, context: Any) -> fastpath_pb2.EventsReply:
        await self._enter("ListEvents", request, context)
        if (request.namespace, request.name) not in self.sandboxes:
            await self._missing(context, "sandbox", request)
        found = self.events.get((request.namespace, request.name), [])
        if request.limit:
            found = found[-request.limit :]
        return fastpath_pb2.EventsReply(
            events_json=[e.model_dump_json(by_alias=True) for e in found]
        )


def sample_events(name: str, start: datetime) -> list[Event]:
    def ev(at: int, reason: str, message: str, type_: str = "Normal", count: int = 1) -> Event:
        return Event.model_validate(
            {
                "kind": "Sandbox",
                "namespace": "default",
                "name": name,
                "uid": f"uid-{name}",
                "type": type_,
                "reason": reason,
                "message": message,
                "timestamp": start + timedelta(seconds=at),
                "count": count,
            }
        )

    return [
        ev(0, "Scheduled", "assigned to agent default-pool-a1 (10.88.0.2) after 1.2 ms"),
        ev(1, "Started", f"container ctr-{name} running after 42.0 ms"),
        ev(30, "Unschedulable", "no free slot in pool default/p", "Warning", count=4),
        ev(60, "Exited", f"container ctr-{name} exited with code 3 (Error)", "Warning"),
    ]


runner = CliRunner()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeWithEvents:
    isolate_env(monkeypatch, tmp_path)
    fake = FakeWithEvents()
    fake.add_sandbox("s1", labels={"team": "ml", "app": "web"}, exposedPorts=[8080])
    fake.events[("default", "s1")] = sample_events("s1", CREATED)
    fake.add_sandbox("quiet")
    return fake


@pytest.fixture
def endpoint(fake: FakeWithEvents, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with serve(fake) as address:
        monkeypatch.setenv("FSB_ENDPOINT", address)
        monkeypatch.setenv("FSB_TOKEN", TOKEN)
        yield address


def test_sdk_events(fake: FakeWithEvents, endpoint: str) -> None:
    with Client() as client:
        got = client.events("s1")
        assert [e.reason for e in got] == ["Scheduled", "Started", "Unschedulable", "Exited"]
        assert got[2].count == 4 and got[2].type == "Warning"
        assert [e.reason for e in client.events("s1", limit=1)] == ["Exited"]
        assert client.events("quiet") == []
        with pytest.raises(NotFound):
            client.events("ghost")
        with pytest.raises(InvalidArgument):
            client.events("s1", kind="Pod")
    request = fake.calls[-1].request
    assert (request.namespace, request.name, request.kind) == ("default", "ghost", "Sandbox")


def test_describe_text_has_every_section_and_the_events_in_order() -> None:
    fake = FakeWithEvents()
    sb = fake.add_sandbox("s1", labels={"team": "ml", "app": "web"}, exposedPorts=[8080])
    from fastsandbox.api.models import Condition, to_wire

    sb.status.conditions = [
        Condition(type="Ready", status="True", reason="Started", last_transition_time=CREATED)
    ]
    sb.spec.expire_time = CREATED + timedelta(hours=2)
    events = [to_wire(e) for e in sample_events("s1", CREATED)]
    text = describe_text(to_wire(sb), events, now=CREATED + timedelta(minutes=5))
    lines = text.splitlines()
    assert lines[0].split() == ["Name:", "s1"]
    for header in ("Spec:", "Status:", "Conditions:", "Events:"):
        assert header in lines
    assert lines.index("Spec:") < lines.index("Status:") < lines.index("Conditions:")
    assert lines.index("Conditions:") < lines.index("Events:")
    # Labels one per line, values aligned.
    label = next(i for i, line in enumerate(lines) if line.startswith("Labels:"))
    assert lines[label].endswith("app=web") and lines[label + 1].strip() == "team=ml"
    assert lines[label + 1].index("team") == lines[label].index("app")
    assert "  Image:" in text and "busybox" in text
    assert "  Phase:" in text and "Running" in text
    assert "10.88.0.2:8080" in text
    assert "(in 1h)" in text  # the expiry is ahead
    events_at = lines.index("Events:")
    table = lines[events_at + 1 :]
    assert table[0].split() == ["AGE", "TYPE", "REASON", "MESSAGE"]
    assert [row.split()[0] for row in table[1:]] == ["5m", "4m", "4m", "4m"]
    type_at = table[0].index("TYPE")
    assert [row[type_at:].split()[0] for row in table[1:]] == [
        "Normal",
        "Normal",
        "Warning",
        "Warning",
    ]
    assert "(x4)" in table[3] and "Unschedulable" in table[3]
    assert table[4].split()[1:4] == ["Warning", "Exited", "container"]
    # Columns line up: every REASON starts where the header's does.
    start = table[0].index("REASON")
    assert all(row[start - 1] == " " and row[start] != " " for row in table[1:])
    cond_at = lines.index("Conditions:")
    assert lines[cond_at + 1].split() == ["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"]
    assert lines[cond_at + 2].split() == ["Ready", "True", "Started", "5m"]


def test_describe_command(fake: FakeWithEvents, endpoint: str) -> None:
    result = runner.invoke(app, ["describe", "s1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split() == ["Name:", "s1"]
    assert "Unschedulable" in result.stdout and "Events:" in result.stdout
    assert fake.methods()[-2:] == ["Get", "ListEvents"]

    quiet = runner.invoke(app, ["describe", "quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert "Events:  <none>" in quiet.stdout


def test_describe_json_and_yaml(fake: FakeWithEvents, endpoint: str) -> None:
    as_json = runner.invoke(app, ["describe", "s1", "-o", "json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["object"]["metadata"]["name"] == "s1"
    assert [e["reason"] for e in data["events"]] == [
        "Scheduled",
        "Started",
        "Unschedulable",
        "Exited",
    ]
    first = data["events"][0]
    assert first["timestamp"].startswith(CREATED.strftime("%Y-%m-%dT%H:%M:%S"))
    assert set(first) == {
        "kind", "namespace", "name", "uid", "type", "reason", "message", "timestamp", "count",
    }  # fmt: skip
    as_yaml = runner.invoke(app, ["describe", "s1", "-o", "yaml"])
    assert as_yaml.exit_code == 0, as_yaml.output
    assert yaml.safe_load(as_yaml.stdout) == data


def test_describe_errors_exit_like_get(fake: FakeWithEvents, endpoint: str) -> None:
    missing = runner.invoke(app, ["describe", "ghost"])
    assert missing.exit_code == 3
    assert missing.stderr.startswith("error: ") and "ghost" in missing.stderr
    assert missing.stdout == ""
    fake.fail("ListEvents", grpc.StatusCode.UNAVAILABLE, "store down")
    down = runner.invoke(app, ["describe", "s1"])
    assert down.exit_code == Unavailable("").exit_code
    assert "store down" in down.stderr and down.stdout == ""
    usage = runner.invoke(app, ["describe"])
    assert usage.exit_code in (0, 2)  # no_args_is_help, as `fsb get`
    assert runner.invoke(app, ["get"]).exit_code == usage.exit_code


def test_describe_is_in_the_help(endpoint: str) -> None:
    result = runner.invoke(app, ["--help"])
    assert "describe" in result.stdout
