"""The control plane's client for agents: one cached gRPC channel per agent, errors translated
into our tree at this one seam (the agent maps its own errors to status codes on its side).

Agents on a unix socket (embedded) need no token: the socket's mode is their authentication.
Agents on `podIP:port` (Kubernetes) each require a bearer token of their own and serve TLS with a
certificate from the controller's agent CA: `AgentClients(auth=fleet.agent_auth)` asks the fleet,
per target, for that agent's token, the CA and the name its certificate must carry
(`fleet.base.AgentAuth`), so a call reaches only the agent it meant to and no agent learns a
token that works on another. `AgentClients(token=...)` (one token for every agent, plaintext) is
kept for agents outside a fleet that knows them (tests, tools).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc

from fastsandbox._grpc_auth import bearer_metadata
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2, agent_pb2_grpc, io_pb2
from fastsandbox.errors import FsbError, Unavailable, from_grpc, never_answered
from fastsandbox.fleet.base import AgentAuth, AgentAuthFor

T = TypeVar("T")

# A new agent's socket appears ~0.3 s after its process starts; grpc's default reconnect backoff
# (1 s and growing) would make readiness and recovery wait for it long after it answers.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

# A Status poll or a Create must not hang the caller when an agent is wedged.
CALL_TIMEOUT_SECONDS = 30.0


def _translate(exc: grpc.aio.AioRpcError, target: str) -> FsbError:
    code, details = exc.code(), exc.details()
    if never_answered(code, details):
        return Unavailable(f"agent at {target} is unreachable: {details}")
    return from_grpc(code, details)  # the agent's own words, e.g. containerd being down


class AgentStatus(FsbError):
    """An agent's own status on an exec/files call, relayed to the Fast-Path caller unchanged.

    The agent already chose the right code (NOT_FOUND for a path, PERMISSION_DENIED, a
    FAILED_PRECONDITION for "is a directory"); folding it into our tree and back would lose it.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.grpc_code = code


def _relayed(exc: grpc.aio.AioRpcError, target: str) -> FsbError:
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        # Either the agent is unreachable or it says the sandbox's supervisor is: both retry.
        return Unavailable(f"agent at {target}: {exc.details()}")
    if code is grpc.StatusCode.CANCELLED:
        return Unavailable(f"agent at {target} ended the call: {exc.details()}")
    return AgentStatus(code, exc.details() or code.name)


class AgentClient:
    def __init__(
        self, target: str, token: str | None = None, auth: AgentAuth | None = None
    ) -> None:
        self.target = target
        self.auth = auth if auth is not None else AgentAuth(token=token)
        if self.auth.root_ca is not None:
            options: list[tuple[str, str | int]] = list(CHANNEL_OPTIONS)
            if self.auth.server_name:
                # We dial the Pod's IP; the certificate must name the agent we meant to reach.
                options.append(("grpc.ssl_target_name_override", self.auth.server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=self.auth.root_ca)
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = agent_pb2_grpc.AgentStub(self._channel)
        self._metadata = bearer_metadata(self.auth.token) if self.auth.token else None

    async def _call(self, method: Any, request: Any, timeout: float) -> Any:
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, self.target) from None

    async def create(self, spec: agent_pb2.SandboxRuntimeSpec) -> agent_pb2.SandboxState:
        reply = await self._call(
            self._stub.CreateSandbox,
            agent_pb2.CreateSandboxRequest(spec=spec),
            CALL_TIMEOUT_SECONDS * 4,  # may include an image pull
        )
        state: agent_pb2.SandboxState = reply.sandbox
        return state

    async def delete(
        self, sandbox_id: str, grace_seconds: float = -1, *, keep_logs: bool = False
    ) -> bool:
        reply = await self._call(
            self._stub.DeleteSandbox,
            agent_pb2.DeleteSandboxRequest(
                sandbox_id=sandbox_id, grace_seconds=grace_seconds, keep_logs=keep_logs
            ),
            CALL_TIMEOUT_SECONDS + max(grace_seconds, 10.0),
        )
        return bool(reply.existed)

    async def status(self, timeout: float = 5.0) -> agent_pb2.StatusResponse:
        reply: agent_pb2.StatusResponse = await self._call(
            self._stub.Status, agent_pb2.StatusRequest(), timeout
        )
        return reply

    async def cordon(self, cordon: bool, timeout: float = 5.0) -> agent_pb2.CordonResponse:
        """Make the agent refuse (True) or accept again (False) new sandboxes; idempotent."""
        reply: agent_pb2.CordonResponse = await self._call(
            self._stub.Cordon, agent_pb2.CordonRequest(cordon=cordon), timeout
        )
        return reply

    async def pull(self, image: str) -> agent_pb2.PullImageResponse:
        reply: agent_pb2.PullImageResponse = await self._call(
            self._stub.PullImage, agent_pb2.PullImageRequest(image=image), 600.0
        )
        return reply

    async def logs(
        self, sandbox_id: str, *, follow: bool, tail_lines: int, since_unix: float = 0.0
    ) -> AsyncIterator[agent_pb2.LogData]:
        """The sandbox's output as the agent sends it: data, stream, timestamp."""
        call = self._stub.Logs(
            agent_pb2.SandboxLogsRequest(
                sandbox_id=sandbox_id,
                follow=follow,
                tail_lines=tail_lines,
                since_unix=since_unix,
            ),
            metadata=self._metadata,
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc, self.target) from None
        finally:
            call.cancel()

    # -- exec and files: streams relayed message by message (grpc's flow control is the
    # backpressure: nothing here reads ahead of what the other side has taken) -------------

    async def _relay(self, call: Any) -> AsyncIterator[Any]:
        """Yield a server-streaming call's messages; its error as ours; cancel it when done."""
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise _relayed(exc, self.target) from None
        finally:
            call.cancel()

    def exec(self, inputs: AsyncIterator[io_pb2.ExecInput]) -> AsyncIterator[io_pb2.ExecOutput]:
        return self._relay(self._stub.Exec(inputs, metadata=self._metadata))

    def read_file(self, request: io_pb2.ReadFileRequest) -> AsyncIterator[io_pb2.FileChunk]:
        return self._relay(self._stub.ReadFile(request, metadata=self._metadata))

    def watch(self, request: io_pb2.WatchRequest) -> AsyncIterator[io_pb2.WatchEvent]:
        return self._relay(self._stub.Watch(request, metadata=self._metadata))

    async def write_file(
        self, inputs: AsyncIterator[io_pb2.WriteFileInput]
    ) -> io_pb2.WriteFileResponse:
        call = self._stub.WriteFile(inputs, metadata=self._metadata)
        try:
            reply: io_pb2.WriteFileResponse = await call
            return reply
        except grpc.aio.AioRpcError as exc:
            raise _relayed(exc, self.target) from None
        finally:
            call.cancel()

    async def file_op(self, request: io_pb2.FileOpRequest) -> io_pb2.FileOpResponse:
        try:
            reply: io_pb2.FileOpResponse = await self._stub.FileOp(
                request, timeout=CALL_TIMEOUT_SECONDS, metadata=self._metadata
            )
            return reply
        except grpc.aio.AioRpcError as exc:
            raise _relayed(exc, self.target) from None

    async def list_processes(self, request: io_pb2.ProcessesRequest) -> io_pb2.ProcessesResponse:
        try:
            reply: io_pb2.ProcessesResponse = await self._stub.ListProcesses(
                request, timeout=CALL_TIMEOUT_SECONDS, metadata=self._metadata
            )
            return reply
        except grpc.aio.AioRpcError as exc:
            raise _relayed(exc, self.target) from None

    async def close(self) -> None:
        await self._channel.close(None)


class AgentClients:
    """One channel per agent target: a channel per call would add a connect to every create."""

    def __init__(self, token: str | None = None, auth: AgentAuthFor | None = None) -> None:
        # `auth`: the fleet's per-agent credentials (asked on every `get`, so an IP reused by
        # another agent gets a channel of its own); else one `token` for every agent. A
        # unix-socket target never gets either (it needs none, and it must not leak locally).
        self._token = token
        self._auth = auth
        self._clients: dict[str, AgentClient] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, target: str) -> AgentClient:
        if target.startswith("unix:"):
            auth = AgentAuth()
        elif self._auth is not None:
            auth = self._auth(target)
        else:
            auth = AgentAuth(token=self._token)
        client = self._clients.get(target)
        if client is not None and client.auth != auth:
            # Another agent now answers at this address: never reuse the old one's channel.
            stale, client = client, None
            task = asyncio.get_running_loop().create_task(stale.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        if client is None:
            client = self._clients[target] = AgentClient(target, auth=auth)
        return client

    async def drop(self, target: str) -> None:
        client = self._clients.pop(target, None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
