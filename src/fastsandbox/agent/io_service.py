"""The agent's I/O RPCs (io.proto): Exec, ListProcesses, FileOp, ReadFile, WriteFile, Watch.

proto ⇄ `supervisor.SupervisorClient`. Every stream is relayed chunk by chunk, pulled by the
side that consumes it (gRPC's flow control on one side, the channel socket's on the other), so
no file or output is ever held whole. Errors come out of the client as `fastsandbox.errors`
and become statuses in `_abort`, like every other agent call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, NoReturn

import grpc

from fastsandbox.agent.manager import SandboxManager
from fastsandbox.agent.runtime.base import ProcessDefaults
from fastsandbox.agent.supervisor import Entry, ExitStatus, Process
from fastsandbox.api._proto.fastsandbox.v1 import io_pb2
from fastsandbox.errors import FailedPrecondition, FsbError, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
FILE_OPS = ("stat", "list", "mkdir", "move", "remove", "setattr")


async def _abort(context: Context, exc: BaseException) -> NoReturn:
    if isinstance(exc, FsbError):
        await context.abort(exc.grpc_code, exc.message)
    log.exception("agent I/O call failed unexpectedly", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"agent error: {exc}")
    raise AssertionError("unreachable")


def entry_to_proto(e: Entry) -> io_pb2.FileEntry:
    return io_pb2.FileEntry(
        name=e.name,
        path=e.path,
        type=e.type,
        size=e.size,
        mode=e.mode,
        uid=e.uid,
        gid=e.gid,
        mtime=e.mtime,
        symlink_target=e.target,
    )


def _sandbox_id(target: io_pb2.SandboxTarget) -> str:
    if not target.sandbox_id:
        raise InvalidArgument("target.sandbox_id: required")
    return target.sandbox_id


def merge_env(defaults: ProcessDefaults, extra: Any) -> list[str]:
    """The sandbox's env (image env + sandbox env, as its main process got it), then the
    exec's own pairs, later names overriding earlier ones in place."""
    env: dict[str, str] = {}
    for item in defaults.env:
        name, _, value = item.partition("=")
        env[name] = value
    for kv in extra:
        if not kv.key or "=" in kv.key:
            raise InvalidArgument(f"env: {kv.key!r} is not a variable name")
        env[kv.key] = kv.value
    return [f"{k}={v}" for k, v in env.items()]


class IoMethods:
    """Mixed into `AgentService`; needs its `manager`."""

    manager: SandboxManager

    # -- processes --------------------------------------------------------------------------
    async def Exec(
        self, request_iterator: AsyncIterator[io_pb2.ExecInput], context: Context
    ) -> AsyncIterator[io_pb2.ExecOutput]:
        try:
            first = await anext(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "start":
                raise InvalidArgument("the first Exec message must be `start`")
            process = await self._start(first.start)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        yield io_pb2.ExecOutput(started=io_pb2.ExecStarted(pid=process.pid))
        refused: list[InvalidArgument] = []
        stdin = first.start.stdin or bool(first.start.attach_pid)
        pumping = asyncio.create_task(
            self._pump_input(request_iterator, process, stdin=stdin, refused=refused),
            name=f"exec input {process.pid}",
        )
        try:
            try:
                async for event in process.events():
                    if isinstance(event, ExitStatus):
                        yield io_pb2.ExecOutput(
                            exited=io_pb2.ExecExited(
                                exit_code=event.code,
                                signal=event.signal or 0,
                                timed_out=event.timed_out,
                            )
                        )
                    elif event.stream == "stdout":
                        yield io_pb2.ExecOutput(stdout=event.data)
                    else:
                        yield io_pb2.ExecOutput(stderr=event.data)
            except Unavailable:
                if refused:  # the input pump closed the stream to end the call with its error
                    raise refused[0] from None
                raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumping
            # The caller went away or the process ended: detach (it keeps running if alive).
            await process.close()

    async def _start(self, start: io_pb2.ExecStart) -> Process:
        client, defaults = await self.manager.supervisor(_sandbox_id(start.target))
        if start.attach_pid > 0:
            return await client.attach(start.attach_pid)
        if not start.argv:
            raise InvalidArgument("start.argv: required (the command to run)")
        if start.timeout_seconds < 0:
            raise InvalidArgument("start.timeout_seconds: must not be negative")
        pty = None
        if start.HasField("pty"):
            if not 0 < start.pty.cols <= 10_000 or not 0 < start.pty.rows <= 10_000:
                raise InvalidArgument("start.pty: cols and rows must be 1..10000")
            pty = (start.pty.cols, start.pty.rows)
        return await client.exec(
            list(start.argv),
            env=merge_env(defaults, start.env),
            cwd=start.cwd or defaults.cwd,
            user=start.user or defaults.user,
            pty=pty,
            stdin=start.stdin,
            timeout_ms=round(start.timeout_seconds * 1000),
            tag=start.tag,
        )

    @classmethod
    async def _pump_input(
        cls,
        inputs: AsyncIterator[io_pb2.ExecInput],
        process: Process,
        *,
        stdin: bool,
        refused: list[InvalidArgument],
    ) -> None:
        """Relay the caller's input. A message the call must refuse ends the call (the
        output side sees its stream closed and raises `refused[0]`); input that arrives after
        the process has exited is dropped, since its exit status is on its way."""
        try:
            await cls._relay_input(inputs, process, stdin=stdin)
        except InvalidArgument as exc:
            refused.append(exc)
            await process.close()
        except FailedPrecondition:
            log.debug("exec input after the process's stream closed", extra={"pid": process.pid})

    @staticmethod
    async def _relay_input(
        inputs: AsyncIterator[io_pb2.ExecInput], process: Process, *, stdin: bool
    ) -> None:
        async for message in inputs:
            kind = message.WhichOneof("kind")
            if kind in ("stdin", "close_stdin") and not stdin:
                raise InvalidArgument("stdin: the process was started with stdin=false")
            if kind == "stdin":
                await process.write_stdin(message.stdin)
            elif kind == "close_stdin":
                await process.close_stdin()
            elif kind == "signal":
                await process.signal(message.signal)
            elif kind == "resize":
                await process.resize(message.resize.cols, message.resize.rows)
            elif kind == "start":
                raise InvalidArgument("start: only the first Exec message may be `start`")

    async def ListProcesses(
        self, request: io_pb2.ProcessesRequest, context: Context
    ) -> io_pb2.ProcessesResponse:
        try:
            client, _ = await self.manager.supervisor(_sandbox_id(request.target))
            processes = await client.ps()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        return io_pb2.ProcessesResponse(
            processes=[
                io_pb2.ProcessInfo(
                    pid=p.pid,
                    argv=list(p.argv),
                    tag=p.tag,
                    pty=p.pty,
                    started_at=p.started_at,
                    running=p.running,
                    main=p.main,
                    exit_code=p.exit_code,
                )
                for p in processes
            ]
        )

    # -- files ------------------------------------------------------------------------------
    async def FileOp(
        self, request: io_pb2.FileOpRequest, context: Context
    ) -> io_pb2.FileOpResponse:
        try:
            return await self._file_op(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    async def _file_op(self, r: io_pb2.FileOpRequest) -> io_pb2.FileOpResponse:
        if r.op not in FILE_OPS:
            raise InvalidArgument(f"op: {r.op!r} is not one of {', '.join(FILE_OPS)}")
        if not r.path:
            raise InvalidArgument("path: required")
        if r.op == "move" and not r.destination:
            raise InvalidArgument("destination: required for move")
        if r.depth < 0:
            raise InvalidArgument("depth: must be 1 or more (0 = 1)")
        client, _ = await self.manager.supervisor(_sandbox_id(r.target))
        mode = r.mode if r.HasField("mode") else None
        if r.op == "stat":
            return io_pb2.FileOpResponse(entries=[entry_to_proto(await client.stat(r.path))])
        if r.op == "list":
            entries = await client.list(r.path, depth=r.depth or 1)
            return io_pb2.FileOpResponse(entries=[entry_to_proto(e) for e in entries])
        if r.op == "mkdir":
            created = await client.mkdir(r.path, mode=mode, parents=r.recursive, user=r.user)
            return io_pb2.FileOpResponse(created=created)
        if r.op == "move":
            moved = await client.move(r.path, r.destination)
            return io_pb2.FileOpResponse(entries=[entry_to_proto(moved)])
        if r.op == "remove":
            await client.remove(r.path, recursive=r.recursive)
            return io_pb2.FileOpResponse()
        mtime = r.mtime if r.HasField("mtime") else None
        entry = await client.setattr(r.path, mode=mode, mtime=mtime)
        return io_pb2.FileOpResponse(entries=[entry_to_proto(entry)])

    async def ReadFile(
        self, request: io_pb2.ReadFileRequest, context: Context
    ) -> AsyncIterator[io_pb2.FileChunk]:
        try:
            if not request.path:
                raise InvalidArgument("path: required")
            if request.offset < 0:
                raise InvalidArgument("offset: must not be negative")
            client, _ = await self.manager.supervisor(_sandbox_id(request.target))
            reader = await client.read(request.path, request.offset)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        first: io_pb2.FileEntry | None = entry_to_proto(reader.entry)
        try:
            async for data in reader.chunks():
                yield io_pb2.FileChunk(entry=first, data=data)
                first = None
            if first is not None:  # an empty file still tells its entry
                yield io_pb2.FileChunk(entry=first)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        finally:
            await reader.close()

    async def WriteFile(
        self, request_iterator: AsyncIterator[io_pb2.WriteFileInput], context: Context
    ) -> io_pb2.WriteFileResponse:
        try:
            first = await anext(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise InvalidArgument("the first WriteFile message must be `header`")
            h = first.header
            if not h.path:
                raise InvalidArgument("header.path: required")
            client, _ = await self.manager.supervisor(_sandbox_id(h.target))
            entry = await client.write(
                h.path,
                _data_chunks(request_iterator),
                mode=h.mode if h.HasField("mode") else None,
                mtime=h.mtime if h.HasField("mtime") else None,
                parents=h.parents,
                user=h.user,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        return io_pb2.WriteFileResponse(entry=entry_to_proto(entry))

    async def Watch(
        self, request: io_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[io_pb2.WatchEvent]:
        try:
            if not request.path:
                raise InvalidArgument("path: required")
            client, _ = await self.manager.supervisor(_sandbox_id(request.target))
            events = client.watch(request.path, recursive=request.recursive)
            async for e in events:
                yield io_pb2.WatchEvent(event=e.event, path=e.path, type=e.type)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)


async def _data_chunks(inputs: AsyncIterable[io_pb2.WriteFileInput]) -> AsyncIterator[bytes]:
    async for message in inputs:
        if message.WhichOneof("kind") != "data":
            raise InvalidArgument("WriteFile: only `data` may follow the header")
        yield message.data
