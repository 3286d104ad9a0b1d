"""The Fast-Path's exec and files RPCs: checked at the edge, then relayed to the sandbox's agent.

The user names a sandbox by namespace + name; the agent knows it by its sandbox id (the container
id). Each call is resolved to the agent holding the sandbox (its channel is cached by
`AgentClients`, so a call costs no connect), the request is checked here (so a bad field is an
INVALID_ARGUMENT naming it before any agent sees it), and the messages are passed on one by one
in both directions. Nothing is buffered beyond the message in hand: a slow reader slows the
writer through grpc's flow control, so a 1 GiB file or an endless output never sits in memory.

The agent's own statuses (NOT_FOUND for a path, PERMISSION_DENIED, FAILED_PRECONDITION for a
directory where a file is wanted) reach the caller unchanged (`AgentStatus`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from fastsandbox.api._proto.fastsandbox.v1 import io_pb2
from fastsandbox.api.models import Sandbox, SandboxPhase
from fastsandbox.errors import (
    FailedPrecondition,
    FsbError,
    InvalidArgument,
    NotFound,
    Unavailable,
)

if TYPE_CHECKING:
    from fastsandbox.control.agent_client import AgentClient
    from fastsandbox.control.sandboxes import SandboxService
    from fastsandbox.metrics import Metrics

Context = grpc.aio.ServicerContext[Any, Any]

# Linux's own limits are larger (ARG_MAX ~2 MiB for argv + env together); these keep one exec
# from costing the agent and supervisor much memory, and are far above what a command needs.
MAX_ARGV_BYTES = 256 * 1024
# An exec or upload relayed to an agent that has not answered heartbeats this long ends with
# UNAVAILABLE: a hung (SIGSTOPped, wedged) agent accepts the connection but never answers, and
# an open stream has no deadline of its own. Longer than a missed heartbeat or two under load.
HUNG_AGENT_SECONDS = 10.0
_HUNG_POLL_SECONDS = 0.5
MAX_ENV_BYTES = 256 * 1024
MAX_ENV_ENTRIES = 4096
MAX_PATH_BYTES = 4096
MAX_TERM = 10_000
MAX_LIST_DEPTH = 64
FILE_OPS = frozenset({"stat", "list", "mkdir", "move", "remove", "setattr"})


# --------------------------------------------------------------------------- checks


def _check_path(path: str, field: str) -> None:
    if not path:
        raise InvalidArgument(f"{field}: required")
    if not path.startswith("/"):
        raise InvalidArgument(f"{field}: must be an absolute path, got {path!r}")
    if "\x00" in path:
        raise InvalidArgument(f"{field}: must not contain NUL")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise InvalidArgument(f"{field}: longer than {MAX_PATH_BYTES} bytes")


def _check_size(size: io_pb2.TermSize, field: str) -> None:
    for axis in ("cols", "rows"):
        value = getattr(size, axis)
        if not 1 <= value <= MAX_TERM:
            raise InvalidArgument(f"{field}.{axis}: must be 1..{MAX_TERM}, got {value}")


def _check_mode(mode: int, field: str) -> None:
    if mode > 0o7777:
        raise InvalidArgument(f"{field}: must be permission bits (at most 0o7777), got {mode:#o}")


def check_start(start: io_pb2.ExecStart) -> None:
    if start.attach_pid < 0:
        raise InvalidArgument("start.attach_pid: must not be negative")
    if start.attach_pid == 0:
        if not start.argv or not start.argv[0]:
            raise InvalidArgument("start.argv: must name a command")
        if any("\x00" in a for a in start.argv):
            raise InvalidArgument("start.argv: must not contain NUL")
        if sum(len(a.encode()) + 1 for a in start.argv) > MAX_ARGV_BYTES:
            raise InvalidArgument(f"start.argv: larger than {MAX_ARGV_BYTES // 1024} KiB")
    if len(start.env) > MAX_ENV_ENTRIES:
        raise InvalidArgument(f"start.env: more than {MAX_ENV_ENTRIES} entries")
    env_bytes = 0
    for i, kv in enumerate(start.env):
        if not kv.key or "=" in kv.key or "\x00" in kv.key or "\x00" in kv.value:
            raise InvalidArgument(f"start.env[{i}]: {kv.key!r} is not a variable name")
        env_bytes += len(kv.key.encode()) + len(kv.value.encode()) + 2
    if env_bytes > MAX_ENV_BYTES:
        raise InvalidArgument(f"start.env: larger than {MAX_ENV_BYTES // 1024} KiB")
    if start.cwd:
        _check_path(start.cwd, "start.cwd")
    if "\x00" in start.user or len(start.user) > 256:
        raise InvalidArgument("start.user: not a user name, uid or uid:gid")
    if start.HasField("pty"):
        _check_size(start.pty, "start.pty")
    if not math.isfinite(start.timeout_seconds) or start.timeout_seconds < 0:
        raise InvalidArgument("start.timeout_seconds: must be a positive number of seconds")


def check_input(msg: io_pb2.ExecInput) -> None:
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("input: empty message")
    if kind == "start":
        raise InvalidArgument("start: only the first message may be start")
    if kind == "signal" and not 1 <= msg.signal <= 64:
        raise InvalidArgument(f"signal: must be a signal number 1..64, got {msg.signal}")
    if kind == "resize":
        _check_size(msg.resize, "resize")


def check_file_op(req: io_pb2.FileOpRequest) -> None:
    if req.op not in FILE_OPS:
        raise InvalidArgument(f"op: must be one of {', '.join(sorted(FILE_OPS))}, got {req.op!r}")
    _check_path(req.path, "path")
    if req.op == "move":
        _check_path(req.destination, "destination")
    if not 0 <= req.depth <= MAX_LIST_DEPTH:
        raise InvalidArgument(f"depth: must be 0..{MAX_LIST_DEPTH}, got {req.depth}")
    if req.HasField("mode"):
        _check_mode(req.mode, "mode")
    if req.HasField("mtime") and not math.isfinite(req.mtime):
        raise InvalidArgument("mtime: must be a finite number of seconds")


def check_write_header(header: io_pb2.WriteFileHeader) -> None:
    _check_path(header.path, "header.path")
    if header.HasField("mode"):
        _check_mode(header.mode, "header.mode")
    if header.HasField("mtime") and not math.isfinite(header.mtime):
        raise InvalidArgument("header.mtime: must be a finite number of seconds")


# --------------------------------------------------------------------------- the relay


def running_on(sb: Sandbox) -> tuple[str, str]:
    """(agent name, sandbox id) of a Running sandbox; FAILED_PRECONDITION naming its phase."""
    ref = f"{sb.metadata.namespace}/{sb.metadata.name}"
    phase = sb.status.phase
    if phase is not SandboxPhase.RUNNING:
        raise FailedPrecondition(f"sandbox {ref} is {phase.value}, not Running")
    if not sb.status.assigned_agent or not sb.status.container_id:
        raise FailedPrecondition(f"sandbox {ref} is Running but has no container yet")
    return sb.status.assigned_agent, sb.status.container_id


class IoRelayRpcs:
    """The exec/files half of `FastPathService` (a mixin: it needs `self.sandboxes`)."""

    sandboxes: SandboxService
    metrics: Metrics | None = None  # set by the plane; the relay works without

    async def _agent_for(self, target: io_pb2.SandboxTarget) -> tuple[AgentClient, str]:
        if not target.name:
            raise InvalidArgument("target.name: required")
        sb = await self.sandboxes.get(target.namespace or "default", target.name)
        agent_name, sandbox_id = running_on(sb)
        agent = self.sandboxes.registry.get_agent(agent_name)
        if agent is None:
            raise NotFound(
                f"sandbox {sb.metadata.namespace}/{sb.metadata.name}: agent "
                f"{agent_name} is not connected right now"
            )
        return self.sandboxes.agents.get(agent.target), sandbox_id

    @contextlib.asynccontextmanager
    async def _hang_guard(self, target: str, refused: list[FsbError]) -> AsyncIterator[None]:
        """Run the body of a relayed stream under the hung-agent watchdog: every
        _HUNG_POLL_SECONDS a timer (not a task per stream) looks at the agent at `target`, and
        once it has not answered heartbeats for HUNG_AGENT_SECONDS cancels the body with
        UNAVAILABLE in `refused`. A cancel that came with a refusal appended to `refused` (the
        watchdog's, or a bad message's) leaves as that refusal; any other stays a cancel."""
        me = asyncio.current_task()
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def check() -> None:
            nonlocal timer
            name, since = self._unready_since(target)
            if (
                me is not None
                and since is not None
                and time.monotonic() - since >= (HUNG_AGENT_SECONDS)
            ):
                refused.append(
                    Unavailable(
                        f"agent {name} has not answered heartbeats for "
                        f"{HUNG_AGENT_SECONDS:.0f}s; the call was ended (the sandbox may still "
                        "run: retry once the agent is back)"
                    )
                )
                timer = None
                me.cancel()
                return
            timer = loop.call_later(_HUNG_POLL_SECONDS, check)

        if me is not None:
            timer = loop.call_later(_HUNG_POLL_SECONDS, check)
        try:
            yield
        except asyncio.CancelledError:
            if not refused or me is None:
                raise
            me.uncancel()
            raise refused[0] from None
        finally:
            if timer is not None:
                timer.cancel()

    def _unready_since(self, target: str) -> tuple[str, float | None]:
        """The agent at `target`: its name and since when it has not answered heartbeats
        (time.monotonic(); None while it answers or when it is not registered)."""
        for agent in self.sandboxes.registry.agents():
            if agent.target == target:
                return agent.name, agent.unready_since
        return target, None

    @staticmethod
    def _agent_target(sandbox_id: str) -> io_pb2.SandboxTarget:
        return io_pb2.SandboxTarget(sandbox_id=sandbox_id)

    async def Exec(
        self, request_iterator: AsyncIterator[io_pb2.ExecInput], context: Context
    ) -> AsyncIterator[io_pb2.ExecOutput]:
        requests = request_iterator.__aiter__()
        arrived = time.perf_counter()
        me = asyncio.current_task()
        refused: list[FsbError] = []

        async def inputs(start: io_pb2.ExecStart) -> AsyncIterator[io_pb2.ExecInput]:
            yield io_pb2.ExecInput(start=start)
            async for msg in requests:
                try:
                    check_input(msg)
                except InvalidArgument as exc:
                    # A bad message mid-stream ends the whole call with its status: the
                    # output loop below is what can still answer the caller.
                    refused.append(exc)
                    if me is not None:
                        me.cancel()
                    return
                yield msg

        try:
            try:
                first = await requests.__anext__()
            except StopAsyncIteration:
                raise InvalidArgument("start: the first message must be start") from None
            if first.WhichOneof("kind") != "start":
                raise InvalidArgument("start: the first message must be start")
            start = first.start
            check_start(start)
            client, sandbox_id = await self._agent_for(start.target)
            relayed = io_pb2.ExecStart()
            relayed.CopyFrom(start)
            relayed.target.CopyFrom(self._agent_target(sandbox_id))
            async with self._hang_guard(client.target, refused):
                async for out in client.exec(inputs(relayed)):
                    if self.metrics is not None and out.WhichOneof("kind") == "started":
                        self.metrics.exec_seconds.observe(time.perf_counter() - arrived)
                    yield out
        except FsbError as exc:
            await context.abort(exc.grpc_code, exc.message)

    async def ListProcesses(
        self, request: io_pb2.ProcessesRequest, context: Context
    ) -> io_pb2.ProcessesResponse:
        try:
            client, sandbox_id = await self._agent_for(request.target)
            return await client.list_processes(
                io_pb2.ProcessesRequest(target=self._agent_target(sandbox_id))
            )
        except FsbError as exc:
            await context.abort(exc.grpc_code, exc.message)
            raise AssertionError("unreachable") from exc

    async def FileOp(
        self, request: io_pb2.FileOpRequest, context: Context
    ) -> io_pb2.FileOpResponse:
        try:
            check_file_op(request)
            client, sandbox_id = await self._agent_for(request.target)
            relayed = io_pb2.FileOpRequest()
            relayed.CopyFrom(request)
            relayed.target.CopyFrom(self._agent_target(sandbox_id))
            return await client.file_op(relayed)
        except FsbError as exc:
            await context.abort(exc.grpc_code, exc.message)
            raise AssertionError("unreachable") from exc

    async def ReadFile(
        self, request: io_pb2.ReadFileRequest, context: Context
    ) -> AsyncIterator[io_pb2.FileChunk]:
        try:
            _check_path(request.path, "path")
            if request.offset < 0:
                raise InvalidArgument("offset: must not be negative")
            client, sandbox_id = await self._agent_for(request.target)
            relayed = io_pb2.ReadFileRequest(
                target=self._agent_target(sandbox_id), path=request.path, offset=request.offset
            )
            async for chunk in client.read_file(relayed):
                yield chunk
        except FsbError as exc:
            await context.abort(exc.grpc_code, exc.message)

    async def WriteFile(
        self, request_iterator: AsyncIterator[io_pb2.WriteFileInput], context: Context
    ) -> io_pb2.WriteFileResponse:
        requests = request_iterator.__aiter__()
        try:
            try:
                first = await requests.__anext__()
            except StopAsyncIteration:
                raise InvalidArgument("header: the first message must be the header") from None
            if first.WhichOneof("kind") != "header":
                raise InvalidArgument("header: the first message must be the header")
            check_write_header(first.header)
            client, sandbox_id = await self._agent_for(first.header.target)
            header = io_pb2.WriteFileHeader()
            header.CopyFrom(first.header)
            header.target.CopyFrom(self._agent_target(sandbox_id))

            async def inputs() -> AsyncIterator[io_pb2.WriteFileInput]:
                yield io_pb2.WriteFileInput(header=header)
                async for msg in requests:
                    # Passed as they come (a stray second header is the agent's to refuse).
                    yield msg

            async with self._hang_guard(client.target, []):
                return await client.write_file(inputs())
        except FsbError as exc:
            await context.abort(exc.grpc_code, exc.message)
            raise AssertionError("unreachable") from exc

    async def Watch(
        self, request: io_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[io_pb2.WatchEvent]:
        try:
            _check_path(request.path, "path")
            client, sandbox_id = await self._agent_for(request.target)
            relayed = io_pb2.WatchRequest(
                target=self._agent_target(sandbox_id),
                path=request.path,
                recursive=request.recursive,
            )
            async for event in client.watch(relayed):
                yield event
        except FsbError as exc:
            await context.abort(exc.grpc_code, exc.message)

    async def RenewLease(self, request: Any, context: Context) -> Any:
        # Leases are served by `FastPathService` itself once that lands (its method overrides
        # this one); until then the SDK is told plainly, and it copes with UNIMPLEMENTED.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "RenewLease: not served yet")
        raise AssertionError("unreachable")
