"""SandboxManager over the in-memory FakeRuntime: capacity, idempotency, status, logs, pull."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from fastsandbox.agent.manager import SandboxManager
from fastsandbox.agent.requests import SandboxRequest
from fastsandbox.agent.runtime.base import ContainerSpec, ContainerState, ContainerStatus, ImageInfo
from fastsandbox.agent.runtime.fake import FakeRuntime
from fastsandbox.api.images import PullCredentials, normalize_image_ref
from fastsandbox.api.labels import AGENT_LABEL, NAME_LABEL, NAMESPACE_LABEL, SANDBOX_ID_LABEL
from fastsandbox.errors import (
    AlreadyExists,
    CapacityExhausted,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from fastsandbox.settings import AgentSettings

IMG = "127.0.0.1:5000/busybox:latest"


def settings(tmp_path: Path, name: str = "agent-1", capacity: int = 2) -> AgentSettings:
    return AgentSettings(
        name=name,
        pool="p",
        namespace="default",
        listen=f"unix://{tmp_path / 'agent.sock'}",
        state_dir=tmp_path / "state",
        containerd_socket=tmp_path / "none.sock",
        capacity=capacity,
        netns_path="/var/run/netns/fsb-agent-1",
        delete_grace_seconds=7.0,
    )


def req(sandbox_id: str, **kw: object) -> SandboxRequest:
    kw.setdefault("image", IMG)
    return SandboxRequest(sandbox_id=sandbox_id, **kw)  # type: ignore[arg-type]


class CountingRuntime(FakeRuntime):
    """Counts pull calls, even the ones the fake answers from its cache."""

    def __init__(self) -> None:
        super().__init__()
        self.pull_calls = 0

    async def pull(self, image: str, credentials: PullCredentials | None = None) -> ImageInfo:
        self.pull_calls += 1
        return await super().pull(image, credentials)


@pytest.fixture
def runtime() -> CountingRuntime:
    return CountingRuntime()


@pytest.fixture
async def manager(runtime: FakeRuntime, tmp_path: Path) -> SandboxManager:
    m = SandboxManager(runtime, settings(tmp_path))
    await m.start()
    return m


async def test_create_builds_the_spec(manager: SandboxManager, runtime: FakeRuntime) -> None:
    state = await manager.create(
        req(
            "sb-1",
            namespace="team-a",
            name="demo",
            command=("sh", "-c"),
            args=("echo hi",),
            env=(("A", "1"),),
            working_dir="/tmp",
            exposed_ports=(8080,),
            labels={"fastsandbox.io/uid": "u1", AGENT_LABEL: "spoofed"},
            cpu_millis=500,
        )
    )
    assert state.status is ContainerStatus.RUNNING
    spec: ContainerSpec = runtime.specs["sb-1"]
    assert spec.log_path == str(manager.settings.state_dir / "logs" / "sb-1.log")
    assert spec.netns_path == "/var/run/netns/fsb-agent-1"
    assert spec.cgroup_parent == "/fastsandbox/agent-1"
    assert (spec.command, spec.args, spec.env, spec.working_dir) == (
        ("sh", "-c"),
        ("echo hi",),
        (("A", "1"),),
        "/tmp",
    )
    assert (spec.cpu_millis, spec.memory_bytes) == (500, None)
    assert spec.labels[AGENT_LABEL] == "agent-1"
    assert spec.labels[SANDBOX_ID_LABEL] == "sb-1"
    assert spec.labels[NAMESPACE_LABEL] == "team-a"
    assert spec.labels[NAME_LABEL] == "demo"
    assert spec.labels["fastsandbox.io/uid"] == "u1"


async def test_create_pulls_a_missing_image_once(
    manager: SandboxManager, runtime: CountingRuntime
) -> None:
    assert IMG not in {i.name for i in await runtime.images()}
    await asyncio.gather(manager.create(req("sb-1")), manager.create(req("sb-2")))
    assert IMG in {i.name for i in await runtime.images()}
    assert runtime.pull_calls == 1


async def test_an_image_pruned_behind_our_back_is_pulled_again(
    manager: SandboxManager, runtime: CountingRuntime, tmp_path: Path
) -> None:
    await manager.create(req("sb-1"))
    pruned = CountingRuntime()  # same agent, a runtime that lost its images
    restarted = SandboxManager(pruned, manager.settings)
    restarted.images.learn([IMG])  # believes the image is cached
    await restarted.create(req("sb-2"))
    assert pruned.pull_calls == 1


async def test_a_bad_image_is_refused_without_a_slot(manager: SandboxManager) -> None:
    with pytest.raises(InvalidArgument):
        await manager.create(SandboxRequest(sandbox_id="sb-1", image="has space"))
    with pytest.raises(NotFound):
        await manager.create(req("sb-1", image="127.0.0.1:5000/nope:1"))
    assert manager.used_slots == 0


async def test_capacity_refusal_and_slot_freed_after_delete(manager: SandboxManager) -> None:
    await manager.create(req("sb-1"))
    await manager.create(req("sb-2"))
    with pytest.raises(CapacityExhausted):
        await manager.create(req("sb-3"))
    assert await manager.delete("sb-1") is True
    await manager.create(req("sb-3"))


async def test_exited_sandboxes_do_not_hold_a_slot(
    manager: SandboxManager, runtime: FakeRuntime
) -> None:
    await manager.create(req("sb-1"))
    await manager.create(req("sb-2"))
    runtime.exit("sb-1", 3)
    await manager.create(req("sb-3"))
    with pytest.raises(CapacityExhausted):
        await manager.create(req("sb-4"))


async def test_concurrent_creates_never_exceed_capacity(manager: SandboxManager) -> None:
    results = await asyncio.gather(
        *(manager.create(req(f"sb-{i}")) for i in range(5)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 2
    assert all(isinstance(r, CapacityExhausted) for r in results if isinstance(r, BaseException))


async def test_one_port_of_a_shared_network_has_one_owner(
    runtime: FakeRuntime, tmp_path: Path
) -> None:
    # Two control-plane replicas each see the other's placements late, so both may send a
    # sandbox exposing 8080 to this agent at once: the agent, whose network the sandboxes
    # share, admits one and refuses the other naming the port (issue 12's port race).
    manager = SandboxManager(runtime, settings(tmp_path, capacity=8))
    await manager.start()
    results = await asyncio.gather(
        *(manager.create(req(f"sb-{i}", exposed_ports=(8080,))) for i in range(5)),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and len(lost) == 4
    for exc in lost:
        assert isinstance(exc, CapacityExhausted) and "port 8080" in exc.message, exc
    await manager.create(req("other-port", exposed_ports=(9090,)))
    # A restarted agent knows the ports of what runs from the containers' labels.
    restarted = SandboxManager(runtime, settings(tmp_path, capacity=8))
    await restarted.start()
    with pytest.raises(CapacityExhausted, match="port 8080 is already exposed"):
        await restarted.create(req("late", exposed_ports=(8080,)))
    # The port is free again once its owner is gone, or has exited.
    assert await restarted.delete(won[0].id) is True
    await restarted.create(req("late", exposed_ports=(8080,)))
    runtime.exit("late", 0)
    await restarted.status()  # the next heartbeat's look at the runtime
    await restarted.create(req("later", exposed_ports=(8080,)))


class SlowRuntime(FakeRuntime):
    """Holds every create until `go` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.go = asyncio.Event()

    async def create(self, spec: ContainerSpec) -> ContainerState:
        self.entered.set()
        await self.go.wait()
        return await super().create(spec)


async def test_a_create_whose_caller_goes_away_finishes(tmp_path: Path) -> None:
    # A control plane killed mid-call: Status said a create is in flight, and a restarted
    # control plane adopts what it finds once none is, so the create must come to run.
    runtime = SlowRuntime()
    manager = SandboxManager(runtime, settings(tmp_path))
    await manager.start()
    call = asyncio.create_task(manager.create(req("sb-1")))
    await runtime.entered.wait()
    assert (await manager.status()).creating == 1
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    runtime.go.set()
    for _ in range(100):
        if await runtime.list():
            break
        await asyncio.sleep(0.01)
    [state] = (await manager.status()).sandboxes
    assert (state.id, state.status) == ("sb-1", ContainerStatus.RUNNING)
    assert manager.used_slots == 1


async def test_create_is_idempotent_even_when_full(
    manager: SandboxManager, runtime: FakeRuntime
) -> None:
    first = await manager.create(req("sb-1"))
    await manager.create(req("sb-2"))
    again = await manager.create(req("sb-1"))
    assert again.id == first.id
    assert again.pid == first.pid
    assert len(await runtime.list()) == 2
    concurrent = await asyncio.gather(*(manager.create(req("sb-2")) for _ in range(3)))
    assert {s.id for s in concurrent} == {"sb-2"}


async def test_delete_is_idempotent_and_removes_the_log(
    manager: SandboxManager, runtime: FakeRuntime
) -> None:
    await manager.create(req("sb-1"))
    log_file = manager.log_path("sb-1")
    log_file.write_bytes(b"out\n")
    assert await manager.delete("sb-1") is True
    assert not log_file.exists()
    assert await runtime.list() == []
    assert await manager.delete("sb-1") is False
    assert await manager.delete("never-existed") is False


async def test_delete_uses_the_default_grace_when_negative(
    manager: SandboxManager, runtime: FakeRuntime
) -> None:
    await manager.create(req("sb-1"))
    await manager.create(req("sb-2"))
    await manager.delete("sb-1", -1)
    await manager.delete("sb-2", 0.5)
    assert runtime.delete_graces == {"sb-1": 7.0, "sb-2": 0.5}


async def test_other_agents_containers_are_left_alone(runtime: FakeRuntime, tmp_path: Path) -> None:
    a = SandboxManager(runtime, settings(tmp_path / "a", name="agent-a"))
    b = SandboxManager(runtime, settings(tmp_path / "b", name="agent-b"))
    await a.start()
    await b.start()
    await a.create(req("sb-1"))
    assert await b.delete("sb-1") is False
    with pytest.raises(AlreadyExists):
        await b.create(req("sb-1"))
    assert [s.id for s in (await b.status()).sandboxes] == []
    assert [s.id for s in (await a.status()).sandboxes] == ["sb-1"]


async def test_bad_ids_are_invalid_argument(manager: SandboxManager) -> None:
    for bad in ("", "../etc", "a/b", "-x"):
        with pytest.raises(InvalidArgument):
            await manager.create(req(bad))
    with pytest.raises(InvalidArgument):
        await manager.create(SandboxRequest(sandbox_id="ok", image=""))


async def test_status_lists_sandboxes_with_exit_codes_and_images(
    manager: SandboxManager, runtime: FakeRuntime
) -> None:
    await manager.create(req("sb-1"))
    await manager.create(req("sb-2"))
    runtime.exit("sb-2", 42)
    status = await manager.status()
    by_id = {s.id: s for s in status.sandboxes}
    assert by_id["sb-1"].status is ContainerStatus.RUNNING
    assert by_id["sb-1"].exit_code is None
    assert by_id["sb-2"].status is ContainerStatus.STOPPED
    assert by_id["sb-2"].exit_code == 42
    assert IMG in {i.name for i in status.images}


async def test_a_restarted_agent_finds_its_sandboxes(
    manager: SandboxManager, runtime: FakeRuntime, tmp_path: Path
) -> None:
    await manager.create(req("sb-1"))
    await manager.create(req("sb-2"))
    restarted = SandboxManager(runtime, settings(tmp_path))
    await restarted.start()
    assert [s.id for s in (await restarted.status()).sandboxes] == ["sb-1", "sb-2"]
    with pytest.raises(CapacityExhausted):
        await restarted.create(req("sb-3"))


async def test_pull(manager: SandboxManager, runtime: FakeRuntime) -> None:
    result = await manager.pull(IMG)
    assert result.image.name == IMG
    assert result.image.digest.startswith("sha256:")
    assert IMG in {i.name for i in (await manager.status()).images}
    with pytest.raises(NotFound):
        await manager.pull("127.0.0.1:5000/nope:latest")


async def collect(manager: SandboxManager, sandbox_id: str, **kw: object) -> bytes:
    return b"".join([c.data async for c in manager.logs(sandbox_id, **kw)])  # type: ignore[arg-type]


async def test_logs_tail(manager: SandboxManager) -> None:
    await manager.create(req("sb-1"))
    manager.log_path("sb-1").write_bytes(b"one\ntwo\nthree\n")
    assert await collect(manager, "sb-1") == b"one\ntwo\nthree\n"
    assert await collect(manager, "sb-1", tail_lines=2) == b"two\nthree\n"
    assert await collect(manager, "sb-1", tail_lines=10) == b"one\ntwo\nthree\n"
    manager.log_path("sb-1").write_bytes(b"one\ntwo\npartial")
    assert await collect(manager, "sb-1", tail_lines=1) == b"partial"


async def test_logs_tail_spans_read_blocks(manager: SandboxManager) -> None:
    await manager.create(req("sb-1"))
    lines = [f"line {i:06d} ".encode() * 20 + b"\n" for i in range(2000)]
    manager.log_path("sb-1").write_bytes(b"".join(lines))
    assert await collect(manager, "sb-1", tail_lines=500) == b"".join(lines[-500:])


async def test_logs_of_unknown_sandbox_is_not_found(manager: SandboxManager) -> None:
    with pytest.raises(NotFound):
        await collect(manager, "nope")


async def test_logs_follow_until_exit(manager: SandboxManager, runtime: FakeRuntime) -> None:
    await manager.create(req("sb-1"))
    path = manager.log_path("sb-1")
    path.write_bytes(b"first\n")
    received: list[bytes] = []
    got_first = asyncio.Event()

    async def follow() -> None:
        async for chunk in manager.logs("sb-1", follow=True):
            received.append(chunk.data)
            got_first.set()

    task = asyncio.create_task(follow())
    await asyncio.wait_for(got_first.wait(), 5)
    with path.open("ab") as f:
        f.write(b"second\n")
    while b"".join(received) != b"first\nsecond\n":
        await asyncio.sleep(0.05)
    assert not task.done()
    with path.open("ab") as f:
        f.write(b"last words\n")
    runtime.exit("sb-1", 0)
    await asyncio.wait_for(task, 10)
    assert b"".join(received) == b"first\nsecond\nlast words\n"


async def test_logs_follow_ends_when_sandbox_deleted(manager: SandboxManager) -> None:
    await manager.create(req("sb-1"))
    manager.log_path("sb-1").write_bytes(b"x\n")
    received: list[bytes] = []

    async def follow() -> None:
        async for chunk in manager.logs("sb-1", follow=True, tail_lines=1):
            received.append(chunk.data)

    task = asyncio.create_task(follow())
    while not received:
        await asyncio.sleep(0.05)
    await manager.delete("sb-1")
    await asyncio.wait_for(task, 10)
    assert received == [b"x\n"]


async def test_log_cap_comes_from_the_spec_or_the_agent_default(
    runtime: FakeRuntime, tmp_path: Path
) -> None:
    logger = tmp_path / "fsb-logger"
    agent = SandboxManager(
        runtime,
        dataclasses.replace(settings(tmp_path), logger_path=logger, log_max_bytes=1 << 20),
    )
    await agent.start()
    await agent.create(req("sb-1"))
    await agent.create(req("sb-2", log_max_bytes=128 * 1024))
    assert runtime.specs["sb-1"].log_max_bytes == 1 << 20
    assert runtime.specs["sb-2"].log_max_bytes == 128 * 1024
    assert runtime.specs["sb-1"].logger_path == str(logger)
    for bad in (-1, 1000):
        with pytest.raises(InvalidArgument, match="log_max_bytes"):
            await agent.create(req(f"sb-bad{bad}", log_max_bytes=bad))
    assert agent.used_slots == 2  # refused before a slot was taken


async def test_disk_limit_is_always_set_zero_meaning_the_agent_default(
    runtime: FakeRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As an agent that may mount (root on the host), whoever runs this test.
    monkeypatch.setattr("fastsandbox.settings.can_mount", lambda: True)
    agent = SandboxManager(
        runtime, dataclasses.replace(settings(tmp_path), default_disk_bytes=256 << 20)
    )
    await agent.start()
    await agent.create(req("sb-1"))
    await agent.create(req("sb-2", disk_bytes=8 << 20))
    assert runtime.specs["sb-1"].disk_bytes == 256 << 20  # 0 is the default, never unlimited
    assert runtime.specs["sb-2"].disk_bytes == 8 << 20
    for bad in (-1, 1000):
        with pytest.raises(InvalidArgument, match="disk_bytes"):
            await agent.create(req(f"sb-bad{bad}", disk_bytes=bad))
    assert agent.used_slots == 2


def test_an_agent_that_cannot_mount_gives_no_disk_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fastsandbox.settings.can_mount", lambda: False)
    assert not settings(tmp_path).enforces_disk_limit


async def test_delete_removes_both_halves_of_a_capped_log(manager: SandboxManager) -> None:
    await manager.create(req("sb-1"))
    path = manager.log_path("sb-1")
    rotated = path.with_name(path.name + ".1")
    path.write_bytes(b"new\n")
    rotated.write_bytes(b"old\n")
    assert b"".join([c.data async for c in manager.logs("sb-1")]) == b"old\nnew\n"
    await manager.delete("sb-1")
    assert not path.exists() and not rotated.exists()


PRIVATE = "127.0.0.1:5000/team/secret:1"
GOOD = PullCredentials("puller", "right")
BAD = PullCredentials("puller", "wrong")


async def test_a_cached_private_image_needs_credentials_the_registry_accepts(
    runtime: FakeRuntime, tmp_path: Path
) -> None:
    runtime.private[PRIVATE] = GOOD
    agent = SandboxManager(runtime, settings(tmp_path))
    await agent.start()
    with pytest.raises(PermissionDenied):
        await agent.create(req("anon-cold", image=PRIVATE))  # the pull itself is refused
    await agent.create(req("owner", image=PRIVATE, pull_credentials=GOOD))
    # Cached now: still only for a caller the registry accepts.
    for name, creds in (("anon", None), ("bad", BAD)):
        with pytest.raises(PermissionDenied) as info:
            await agent.create(req(name, image=PRIVATE, pull_credentials=creds))
        assert "right" not in info.value.message and "wrong" not in info.value.message
    await agent.create(req("owner-2", image=PRIVATE, pull_credentials=GOOD))
    assert agent.used_slots == 2  # refused creates took no slot
    assert {s.id for s in await runtime.list()} == {"owner", "owner-2"}


async def test_a_public_image_pulled_anonymously_needs_no_probe(
    runtime: FakeRuntime, tmp_path: Path
) -> None:
    agent = SandboxManager(runtime, settings(tmp_path))
    await agent.start()
    await agent.create(req("p1"))
    await agent.create(req("p2"))
    assert runtime.probes == [(normalize_image_ref(IMG), None)]  # the pull's own check


async def test_a_public_image_pulled_with_credentials_stays_public(
    runtime: FakeRuntime, tmp_path: Path
) -> None:
    agent = SandboxManager(runtime, settings(tmp_path))
    await agent.start()
    await agent.create(req("p1", pull_credentials=GOOD))
    await agent.create(req("p2"))  # an anonymous probe finds it public
    assert runtime.probes[-1] == (normalize_image_ref(IMG), None)
