"""Lifecycle after create, over the same fakes as test_control_plane: exits, expiry, reset,
agent loss with both failure policies, deletion while the agent is down, expired-record GC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc
from fastsandbox.api.models import Sandbox, SandboxPhase
from fastsandbox.api.phases import condition
from fastsandbox.control.fastpath.auth import TokenAuth
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.errors import NotFound
from fastsandbox.fleet.inprocess import InProcessFleet
from fastsandbox.store.memory import MemoryStore
from tests.unit.test_control_plane import TOKEN, Plane, auth, eventually, free_port, make_pool

P = SandboxPhase


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
    server = grpc.aio.server(interceptors=[TokenAuth(TOKEN)])
    fastpath_pb2_grpc.add_FastPathServicer_to_server(cp.servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Plane(cp, store, fleet, fastpath_pb2_grpc.FastPathStub(channel), channel)
    finally:
        await channel.close()
        await server.stop(0)
        await cp.close()
        await store.close()


async def get(plane: Plane, name: str) -> Sandbox:
    return await plane.store.get(Sandbox, "default", name)


async def phase_is(plane: Plane, name: str, phase: SandboxPhase) -> bool:
    return (await get(plane, name)).status.phase is phase


async def gone(plane: Plane, name: str) -> bool:
    try:
        await get(plane, name)
    except NotFound:
        return True
    return False


@pytest.mark.parametrize(
    ("code", "reason", "phase", "want_reason"),
    [
        (0, "", P.SUCCEEDED, "Completed"),
        (3, "", P.FAILED, "Error"),
        (137, "OOMKilled", P.FAILED, "OOMKilled"),
    ],
)
async def test_exit_sets_phase_and_frees_the_slot(
    plane: Plane, code: int, reason: str, phase: SandboxPhase, want_reason: str
) -> None:
    reply = await plane.create("ex", exposed_ports=[8080])
    plane.fleet.runtime(reply.agent).exit(reply.container_id, code, reason=reason)
    await eventually(lambda: phase_is(plane, "ex", phase))
    sb = await get(plane, "ex")
    assert sb.status.exit_code == code
    ready = condition(sb.status, "Ready")
    assert ready is not None and ready.reason == want_reason
    assert plane.plane.registry.holder(reply.container_id) is None
    # The slot and the port are usable again; the record stays until deleted.
    for name in ("n1", "n2", "n3"):
        await plane.create(name, exposed_ports=[8080] if name == "n1" else [])
    assert (await get(plane, "ex")).status.phase is phase


async def test_ttl_expiry_keeps_the_record_and_removes_the_container(plane: Plane) -> None:
    reply = await plane.create("ttl", ttl_seconds=1)
    await eventually(lambda: phase_is(plane, "ttl", P.EXPIRED), timeout=30)
    sb = await get(plane, "ttl")
    assert not sb.status.assigned_agent and not sb.status.container_id
    assert not sb.status.endpoints
    assert reply.container_id in plane.fleet.runtime(reply.agent).delete_graces
    assert plane.plane.registry.holder(reply.container_id) is None
    answer = await plane.stub.Delete(fastpath_pb2.DeleteRequest(name="ttl"), metadata=auth())
    assert answer.phase == "Deleted"  # immediate: nothing left to stop
    assert await gone(plane, "ttl")


async def test_expired_records_are_collected_after_retention(plane: Plane) -> None:
    plane.plane.lifecycle.expired_retention = 0.5
    await plane.create("old", ttl_seconds=1)
    await eventually(lambda: gone(plane, "old"), timeout=30)


async def test_reset_recreates_the_container(plane: Plane) -> None:
    first = await plane.create("rs")
    sb = await get(plane, "rs")
    sb.spec.reset_revision = "2026-11-23T00:00:00.001Z"
    await plane.store.update(sb)

    async def reset_done() -> bool:
        s = await get(plane, "rs")
        return s.status.observed_reset_revision == "2026-11-23T00:00:00.001Z"

    await eventually(reset_done)
    after = await get(plane, "rs")
    assert after.status.phase is P.RUNNING
    assert after.status.container_id != first.container_id
    assert first.container_id in plane.fleet.runtime(first.agent).delete_graces
    assert plane.plane.registry.holder(first.container_id) is None


async def test_an_exited_sandbox_loses_its_container_and_keeps_its_log_until_deleted(
    plane: Plane, tmp_path: Path
) -> None:
    reply = await plane.create("lx")
    runtime = plane.fleet.runtime(reply.agent)
    log = tmp_path / reply.agent / "logs" / f"{reply.container_id}.log"
    log.write_bytes(b"last words\n")  # as fsb-logger would have
    runtime.exit(reply.container_id, 3)

    async def container_gone() -> bool:
        return reply.container_id not in {s.id for s in await runtime.list()}

    await eventually(lambda: phase_is(plane, "lx", P.FAILED))
    await eventually(container_gone)
    assert log.exists()
    request = fastpath_pb2.LogsRequest(namespace="default", name="lx")
    data = b"".join([c.data async for c in plane.stub.Logs(request, metadata=auth())])
    assert data == b"last words\n"
    assert (await get(plane, "lx")).status.exit_code == 3  # the record is as it was
    await plane.stub.Delete(
        fastpath_pb2.DeleteRequest(namespace="default", name="lx", wait=True), metadata=auth()
    )
    await eventually(lambda: gone(plane, "lx"))
    assert not log.exists()  # the log goes with the record


async def test_reset_starts_an_exited_sandbox_again(plane: Plane) -> None:
    first = await plane.create("rx")
    plane.fleet.runtime(first.agent).exit(first.container_id, 0)
    await eventually(lambda: phase_is(plane, "rx", P.SUCCEEDED))
    sb = await get(plane, "rx")
    sb.spec.reset_revision = "r2"
    await plane.store.update(sb)
    await eventually(lambda: phase_is(plane, "rx", P.RUNNING))
    assert (await get(plane, "rx")).status.container_id != first.container_id


async def test_manual_policy_becomes_lost_and_stays(plane: Plane) -> None:
    # A timeout of some seconds, so that reading the phase right after the agent is seen
    # unreachable comes before it even when the machine is loaded.
    reply = await plane.create("man", failure_policy="Manual", recovery_timeout_seconds=3)
    await plane.fleet.kill(reply.agent)

    async def unreachable() -> bool:
        cond = condition((await get(plane, "man")).status, "AgentReachable")
        return cond is not None and cond.status == "False"

    await eventually(unreachable, timeout=30)
    assert (await get(plane, "man")).status.phase is P.RUNNING  # not before the timeout
    await eventually(lambda: phase_is(plane, "man", P.LOST), timeout=30)
    sb = await get(plane, "man")
    assert sb.status.assigned_agent == reply.agent  # never rescheduled by itself


async def test_agent_back_within_timeout_keeps_its_sandbox(plane: Plane) -> None:
    reply = await plane.create("back", failure_policy="AutoRecreate", recovery_timeout_seconds=30)
    await plane.fleet.kill(reply.agent)

    async def unreachable() -> bool:
        cond = condition((await get(plane, "back")).status, "AgentReachable")
        return cond is not None and cond.status == "False"

    await eventually(unreachable, timeout=30)
    await plane.fleet.start()  # the agent process comes back

    async def reachable() -> bool:
        cond = condition((await get(plane, "back")).status, "AgentReachable")
        return cond is not None and cond.status == "True"

    await eventually(reachable, timeout=30)
    sb = await get(plane, "back")
    assert sb.status.container_id == reply.container_id
    assert sb.status.phase is P.RUNNING


async def test_auto_recreate_moves_to_another_agent_after_the_timeout(plane: Plane) -> None:
    reply = await plane.create("auto", failure_policy="AutoRecreate", recovery_timeout_seconds=1)
    await plane.fleet.kill(reply.agent)

    async def moved() -> bool:
        s = await get(plane, "auto")
        return s.status.phase is P.RUNNING and s.status.assigned_agent not in ("", reply.agent)

    await eventually(moved, timeout=30)
    sb = await get(plane, "auto")
    assert sb.status.container_id != reply.container_id
    rescheduled = condition(sb.status, "Rescheduled")
    assert rescheduled is not None and rescheduled.message == reply.agent


async def test_delete_while_agent_down_waits_for_the_timeout_and_leaks_nothing(
    plane: Plane,
) -> None:
    reply = await plane.create("dd", recovery_timeout_seconds=1, exposed_ports=[9000])
    await plane.fleet.kill(reply.agent)
    await eventually(lambda: _agent_unready(plane, reply.agent), timeout=30)
    answer = await plane.stub.Delete(fastpath_pb2.DeleteRequest(name="dd"), metadata=auth())
    assert answer.phase == "Terminating"
    assert (await get(plane, "dd")).status.phase is P.TERMINATING
    await eventually(lambda: gone(plane, "dd"), timeout=30)
    assert plane.plane.registry.holder(reply.container_id) is None


async def _agent_unready(plane: Plane, name: str) -> bool:
    agent = plane.plane.registry.get_agent(name)
    return agent is not None and not agent.ready


async def test_shortened_expiry_fires_on_the_new_deadline(plane: Plane) -> None:
    from datetime import timedelta

    from fastsandbox.api.models import now

    await plane.create("later", ttl_seconds=3600)
    sb = await get(plane, "later")
    sb.spec.expire_time = now() + timedelta(seconds=1)
    await plane.store.update(sb)
    await eventually(lambda: phase_is(plane, "later", P.EXPIRED), timeout=30)


async def test_a_reschedule_without_room_does_not_resume_on_the_returning_agent(
    plane: Plane,
) -> None:
    """AutoRecreate gives up the old container after the timeout; if no slot is free and the old
    agent then comes back, the sandbox must not be Running on the given-up container without a
    slot. Once the janitor has removed that container, a new one starts with a slot."""
    first = await plane.create("auto", failure_policy="AutoRecreate", recovery_timeout_seconds=1)
    # Fill the pool (2 agents x 2): the fillers never move by themselves.
    for i in range(3):
        await plane.create(f"fill{i}", failure_policy="Manual", recovery_timeout_seconds=3600)
    await plane.fleet.kill(first.agent)

    async def waiting_unassigned() -> bool:
        s = await get(plane, "auto")
        scheduled = condition(s.status, "Scheduled")
        return (
            not s.status.assigned_agent
            and scheduled is not None
            and scheduled.reason == "Unschedulable"
        )

    await eventually(waiting_unassigned, timeout=30)
    await plane.fleet.start()  # the old agent comes back, still running the given-up container
    await eventually(lambda: _agent_ready(plane, first.agent), timeout=30)
    await asyncio.sleep(0.5)  # several heartbeats and reconciler passes
    sb = await get(plane, "auto")
    assert sb.status.phase is P.PENDING and not sb.status.container_id

    # What the janitor does with a container no record claims:
    await plane.fleet.runtime(first.agent).delete(first.container_id, 0)

    async def running_again() -> bool:
        s = await get(plane, "auto")
        return s.status.phase is P.RUNNING and bool(s.status.container_id)

    await eventually(running_again, timeout=30)
    sb = await get(plane, "auto")
    assert sb.status.container_id != first.container_id
    holder = plane.plane.registry.holder(sb.status.container_id)
    assert holder is not None and holder.name == sb.status.assigned_agent


async def _agent_ready(plane: Plane, name: str) -> bool:
    agent = plane.plane.registry.get_agent(name)
    return agent is not None and agent.ready


async def test_a_returning_agent_stops_its_superseded_copy_before_it_counts_as_ready(
    plane: Plane,
) -> None:
    """Fencing (issue 12): the AutoRecreate sandbox runs elsewhere now; the old agent comes back
    still running the given-up container. The heartbeat that finds it back stops that container
    before the agent counts as ready, so the two copies never run past that heartbeat."""
    first = await plane.create("fence", failure_policy="AutoRecreate", recovery_timeout_seconds=1)
    await plane.fleet.kill(first.agent)

    async def moved() -> bool:
        s = await get(plane, "fence")
        return s.status.phase is P.RUNNING and s.status.assigned_agent not in ("", first.agent)

    await eventually(moved, timeout=30)
    old_runtime = plane.fleet.runtime(first.agent)
    assert first.container_id in {c.id for c in await old_runtime.list()}
    await plane.fleet.start()  # the old agent comes back, still running the old copy
    await eventually(lambda: _agent_ready(plane, first.agent), timeout=30)
    # Causality, not timing: by the time the agent is ready again the old copy is gone.
    assert first.container_id not in {c.id for c in await old_runtime.list()}
    assert old_runtime.delete_graces[first.container_id] == 0
    assert not plane.plane.registry.agent(first.agent).superseded
    sb = await get(plane, "fence")
    assert sb.status.phase is P.RUNNING and sb.status.container_id != first.container_id


async def test_pull_credentials_reach_the_agent_and_are_never_stored(plane: Plane) -> None:
    from fastsandbox.api.images import PullCredentials, normalize_image_ref
    from tests.unit.test_control_plane import IMG

    secret = PullCredentials("puller", "s3cret-pw")
    for agent in plane.plane.registry.agents():
        plane.fleet.runtime(agent.name).private[normalize_image_ref(IMG)] = secret
    denied = await plane.code_of(plane.create("anon"))
    assert denied is grpc.StatusCode.PERMISSION_DENIED
    assert not await stored(plane, "anon")  # refused with nothing made
    creds = fastpath_pb2.PullCredentials(username="puller", password="s3cret-pw")
    reply = await plane.create("owner", pull_credentials=creds)
    assert reply.phase == "Running"
    await eventually(lambda: stored(plane, "owner"))
    record = (await get(plane, "owner")).model_dump_json()
    assert "s3cret-pw" not in record
    runtime = plane.fleet.runtime(reply.agent)
    assert all("s3cret-pw" not in str(v) for v in runtime.specs[reply.container_id].labels.values())


async def stored(plane: Plane, name: str) -> bool:
    try:
        await get(plane, name)
    except NotFound:
        return False
    return True
