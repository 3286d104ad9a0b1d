"""Crash recovery: rebuild the registry from records and agent reports before serving writes.

After a restart (clean or kill -9) the registry is empty while sandboxes keep running under
containerd. Accepting a create before the registry knows them would hand out slots and ports that
are taken, so the server runs this first: adopt the fleet's agents, ask each what it runs, and
take a slot for every container a record points at, and for every live container the agent
reports without a record (the agent is the capacity authority; such orphans are handled by the
janitor of the lifecycle work, until then they keep their slot rather than be double-booked).
Creates the previous control plane left in flight at an agent run to their end there; the
agent's report is read once they have, so a record is rebuilt only for a container that runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2
from fastsandbox.api.labels import API_VERSION, PORTS_LABEL
from fastsandbox.api.models import Sandbox, SandboxPool, Timings
from fastsandbox.api.phases import HOLDS_SLOT
from fastsandbox.control.agent_client import AgentClient
from fastsandbox.control.create_request import REQUEST_LABEL
from fastsandbox.control.pools import PoolManager
from fastsandbox.control.registry import Allocation
from fastsandbox.control.sandboxes import SandboxService
from fastsandbox.errors import AlreadyExists, FsbError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    agents: int
    agents_ready: int
    records: int
    slots_adopted: int
    orphans: int
    # Fast-mode creates whose record was never written (crash in between), rebuilt from the
    # request the container carries.
    records_rebuilt: int = 0


# How long recovery waits for creates an agent still had in flight for the previous control
# plane; a create takes well under a second, several on a loaded machine, longer only with an
# image pull (then its record is rebuilt while it runs, and converges like any other).
SETTLE_SECONDS = 15.0
_SETTLE_POLL_SECONDS = 0.2


def _ports(labels: Iterable[agent_pb2.KeyValue]) -> list[int]:
    """The ports an agent recorded on a container (label `fastsandbox.io/ports`, "80,443")."""
    for kv in labels:
        if kv.key == PORTS_LABEL:
            return [int(p) for p in kv.value.split(",") if p.strip().isdigit()]
    return []


async def _adopt_record(
    sandboxes: SandboxService, allocation: Allocation, state: agent_pb2.SandboxState
) -> bool:
    body = next((kv.value for kv in state.labels if kv.key == REQUEST_LABEL), "")
    if not body:
        return False
    try:
        data = json.loads(body)
        sb = Sandbox.model_validate({**data, "apiVersion": API_VERSION, "kind": "Sandbox"})
    except ValueError:
        return False
    sandboxes.mark_running(sb, allocation, state, Timings())
    try:
        stored = await sandboxes.store.create(sb)
    except AlreadyExists:
        return False  # the name was taken meanwhile: this container is an orphan after all
    if stored.status.phase is not sb.status.phase:
        # Kubernetes keeps no status on create (the status subresource owns it).
        stored.status = sb.status.model_copy(deep=True)
        stored = await sandboxes.store.update_status(stored)
    sandboxes.remember(stored)
    sandboxes.events.warning(
        stored,
        "Recovered",
        f"record rebuilt from container {state.sandbox_id} on agent {allocation.agent}: the "
        "control plane stopped between starting it and storing its record",
    )
    log.warning(
        "rebuilt the record of a sandbox started just before a crash",
        extra={
            "sandbox": f"{sb.metadata.namespace}/{sb.metadata.name}",
            "sandbox_id": state.sandbox_id,
        },
    )
    return True


async def _settled_status(
    client: AgentClient, *, settle: bool, timeout: float = SETTLE_SECONDS
) -> agent_pb2.StatusResponse | None:
    """The agent's report, read (with `settle`) once the creates it still had in flight for the
    previous control plane have finished, or at `timeout`; None when it does not answer.

    Those creates run to their end at the agent (or fail and are removed); a report read before
    they finish may miss their container, or show one whose record, rebuilt from it, would claim
    a container that never runs. The report used is asked for after one that showed no create
    in flight: a create finishing while the agent reads the runtime can be in neither the list
    nor the count of that same report."""
    deadline = time.monotonic() + timeout
    latest: agent_pb2.StatusResponse | None = None
    quiet = not settle
    while True:
        try:
            latest = await client.status()
        except FsbError as exc:
            log.warning(
                "agent status failed during recovery",
                extra={"target": client.target, "err": exc.message},
            )
        else:
            if quiet:
                return latest
            quiet = latest.creating == 0
            if quiet:
                continue
            log.info(
                "waiting for creates in flight at the agent",
                extra={"target": client.target, "creating": latest.creating},
            )
        if time.monotonic() >= deadline:
            return latest
        await asyncio.sleep(_SETTLE_POLL_SECONDS)


async def recover(
    pools: PoolManager,
    sandboxes: SandboxService,
    *,
    rebuild_records: bool = True,
    settle: bool | None = None,
) -> RecoveryReport:
    """`settle` (default: `rebuild_records`) waits for creates in flight at the agents. With
    replicas it is off: those are the other replicas' live work, not a dead control plane's
    leftovers. Records are rebuilt there all the same (a replica killed between answering a
    Fast create and storing it leaves only the label); a live replica storing the same create
    meanwhile finds the rebuilt record, with its own uid, and keeps it."""
    registry = pools.registry
    by_key = {
        (p.metadata.namespace, p.metadata.name): p for p in await pools.store.list(SandboxPool)
    }
    for handle in await pools.fleet.start():
        pool = by_key.get((handle.namespace, handle.pool))
        pools.register(handle, pool.spec.max_sandboxes_per_agent if pool else 1)

    agents = registry.agents()
    ready = await asyncio.gather(*(pools.wait_ready(a, timeout=20.0) for a in agents))

    records = await sandboxes.load()
    adopted = 0
    claimed: set[str] = set()
    for sb in records:
        holder, sandbox_id = sb.status.assigned_agent, sb.status.container_id
        if (
            holder
            and sandbox_id
            and sb.status.phase in HOLDS_SLOT
            and registry.get_agent(holder) is not None
        ):
            registry.adopt(holder, sandbox_id, sb.spec.exposed_ports)
            claimed.add(sandbox_id)
            adopted += 1

    live = [a for a in agents if a.ready]
    wait = rebuild_records if settle is None else settle
    reports = await asyncio.gather(
        *(_settled_status(sandboxes.agents.get(a.target), settle=wait) for a in live)
    )
    orphans = 0
    rebuilt = 0
    for agent, status in zip(live, reports, strict=True):
        if status is None:
            continue
        for state in status.sandboxes:
            if state.sandbox_id in claimed or state.exited:
                continue
            allocation = registry.adopt(agent.name, state.sandbox_id, _ports(state.labels))
            if rebuild_records and await _adopt_record(sandboxes, allocation, state):
                rebuilt += 1
                continue
            orphans += 1
            log.warning(
                "container without a record keeps its slot until the janitor removes it",
                extra={"agent": agent.name, "sandbox_id": state.sandbox_id},
            )
    report = RecoveryReport(
        agents=len(agents),
        agents_ready=sum(ready),
        records=len(records),
        slots_adopted=adopted,
        orphans=orphans,
        records_rebuilt=rebuilt,
    )
    log.info("recovered", extra=asdict(report))
    return report
