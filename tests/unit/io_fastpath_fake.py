"""The fake Fast-Path (`fastpath_fake`) with the real exec/files relay, in front of the fake
agent (`agent_io_fake`): SDK and CLI tests drive commands and files through the real relay code
and the real token check, with no containerd underneath."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc, io_pb2
from fastsandbox.control.agent_client import AgentClient, AgentClients
from fastsandbox.control.fastpath.auth import TokenAuth
from fastsandbox.control.fastpath.io_relay import IoRelayRpcs, running_on
from fastsandbox.errors import NotFound
from tests.unit.agent_io_fake import FakeAgentIo, serve_agent
from tests.unit.fastpath_fake import TOKEN, FakeFastPath
from tests.unit.loop_thread import serve_in_thread


@dataclass
class IoFastPath(IoRelayRpcs, FakeFastPath):  # type: ignore[misc]
    agent_target: str = ""
    agent: FakeAgentIo | None = None
    _clients: AgentClients | None = None
    serve_leases: bool = False
    renewals: list[str] = field(default_factory=list)

    async def RenewLease(self, request: Any, context: Any) -> Any:
        if not self.serve_leases:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "RenewLease: not served here")
        self.renewals.append(request.name)
        return fastpath_pb2.RenewLeaseReply(lease_expire_time="2030-01-01T00:00:00Z")

    # The fake agent's readiness, as heartbeats would see it (the relay's hung-agent watchdog).
    unready_since: float | None = None

    def _unready_since(self, target: str) -> tuple[str, float | None]:
        return "fake-agent", self.unready_since

    async def _agent_for(self, target: io_pb2.SandboxTarget) -> tuple[AgentClient, str]:
        sb = self.sandboxes.get((target.namespace or "default", target.name))  # type: ignore[attr-defined]
        if sb is None:
            raise NotFound(f"sandbox {target.namespace or 'default'}/{target.name} not found")
        _, sandbox_id = running_on(sb)
        if self.agent is not None:
            # What the real agent knows from CreateSandbox: the sandbox's own environment.
            self.agent.sandbox_env[sandbox_id] = {e.name: e.value for e in sb.spec.env}
        if self._clients is None:
            self._clients = AgentClients()
        return self._clients.get(self.agent_target), sandbox_id


@dataclass
class Rig:
    endpoint: str
    fastpath: IoFastPath
    agent: FakeAgentIo
    root: Path


@contextlib.contextmanager
def serve_io(tmp_path: Path, credentials: grpc.ServerCredentials | None = None) -> Iterator[Rig]:
    """The fake Fast-Path with exec/files relayed to a fake agent; TLS with `credentials`."""
    root = tmp_path / "sandbox-root"
    (root / "tmp").mkdir(parents=True)
    agent = FakeAgentIo(root)
    with serve_agent(agent, tmp_path / "agent.sock") as target:
        fastpath = IoFastPath(agent_target=target, agent=agent)

        def add(server: grpc.aio.Server) -> str:
            fastpath_pb2_grpc.add_FastPathServicer_to_server(fastpath, server)
            if credentials is not None:
                return f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', credentials)}"
            return f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"

        async def close_clients() -> None:
            if fastpath._clients is not None:
                await fastpath._clients.close()

        with serve_in_thread(
            add, interceptors=[TokenAuth(TOKEN)], cleanup=close_clients, name="fake Fast-Path"
        ) as endpoint:
            yield Rig(endpoint, fastpath, agent, root)
