"""A fake agent for exec/files client tests: the real agent gRPC interface over real processes.

Exec runs the argv as a local subprocess (with a real PTY when asked, so `stty size` sees a
resize), FileOp/ReadFile/WriteFile work on a temporary directory standing in for the sandbox's
root (`/tmp/x` is `<root>/tmp/x`). It records the sandbox ids it was asked about, so a test can
see the control plane translated namespace/name into the agent's id. Served on a unix socket
from its own loop thread. This tests everything above the agent, not the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import shutil
import signal
import stat as stat_mod
import struct
import termios
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc

from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2_grpc, io_pb2
from tests.unit.loop_thread import serve_in_thread

CHUNK = 256 * 1024


class FakeAgentIo(agent_pb2_grpc.AgentServicer):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sandbox_ids: list[str] = []
        self.inputs: list[str] = []
        self.sandbox_env: dict[str, dict[str, str]] = {}
        self.pids: list[int] = []  # every child Exec started, so a test can see it was reaped

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def _entry(self, path: str) -> io_pb2.FileEntry:
        st = os.lstat(self.host(path))
        kind = (
            "dir"
            if stat_mod.S_ISDIR(st.st_mode)
            else "file"
            if stat_mod.S_ISREG(st.st_mode)
            else "symlink"
            if stat_mod.S_ISLNK(st.st_mode)
            else "other"
        )
        return io_pb2.FileEntry(
            name=os.path.basename(path.rstrip("/")) or "/",
            path=path,
            type=kind,
            size=st.st_size,
            mode=stat_mod.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime=st.st_mtime,
        )

    async def _fail(self, context: Any, exc: OSError, path: str) -> None:
        if isinstance(exc, FileNotFoundError):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{path}: no such file or directory")
        if isinstance(exc, IsADirectoryError):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{path}: is a directory")
        if isinstance(exc, PermissionError):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{path}: permission denied")
        await context.abort(grpc.StatusCode.INTERNAL, f"{path}: {exc}")

    # -- exec ------------------------------------------------------------------------------
    async def Exec(
        self, request_iterator: AsyncIterator[io_pb2.ExecInput], context: Any
    ) -> AsyncIterator[io_pb2.ExecOutput]:
        requests = request_iterator.__aiter__()
        first = await requests.__anext__()
        start = first.start
        self.sandbox_ids.append(start.target.sandbox_id)
        env = (
            dict(os.environ)
            | self.sandbox_env.get(start.target.sandbox_id, {})
            | {kv.key: kv.value for kv in start.env}
        )
        cwd = str(self.host(start.cwd)) if start.cwd else str(self.root)
        out: asyncio.Queue[io_pb2.ExecOutput | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        master = -1
        if start.HasField("pty"):
            master, slave = pty.openpty()
            fcntl.ioctl(
                slave, termios.TIOCSWINSZ, struct.pack("HHHH", start.pty.rows, start.pty.cols, 0, 0)
            )
            # `setsid -c`: a new session whose controlling terminal is the PTY, so Ctrl-C typed
            # into it is a SIGINT (no preexec_fn: forking a process full of grpc threads with
            # Python code to run in the child can deadlock).
            proc = await asyncio.create_subprocess_exec(
                "setsid",
                "-c",
                *start.argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                cwd=cwd,
            )
            os.close(slave)
            done = asyncio.Event()

            def readable() -> None:
                try:
                    data = os.read(master, CHUNK)
                except OSError:
                    data = b""
                if data:
                    out.put_nowait(io_pb2.ExecOutput(stdout=data))
                else:
                    loop.remove_reader(master)
                    done.set()

            loop.add_reader(master, readable)
            readers = [asyncio.ensure_future(done.wait())]
        else:
            proc = await asyncio.create_subprocess_exec(
                *start.argv,
                stdin=asyncio.subprocess.PIPE if start.stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

            async def pump(stream: asyncio.StreamReader, kind: str) -> None:
                while data := await stream.read(CHUNK):
                    await out.put(io_pb2.ExecOutput(**{kind: data}))

            assert proc.stdout and proc.stderr
            readers = [
                asyncio.ensure_future(pump(proc.stdout, "stdout")),
                asyncio.ensure_future(pump(proc.stderr, "stderr")),
            ]
        self.pids.append(proc.pid)
        yield io_pb2.ExecOutput(started=io_pb2.ExecStarted(pid=proc.pid))

        async def feed() -> None:
            async for msg in requests:
                kind = msg.WhichOneof("kind")
                self.inputs.append(kind or "")
                if kind == "stdin":
                    if master >= 0:
                        os.write(master, msg.stdin)
                    elif proc.stdin:
                        proc.stdin.write(msg.stdin)
                        await proc.stdin.drain()
                elif kind == "close_stdin" and proc.stdin:
                    proc.stdin.close()
                elif kind == "signal":
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, msg.signal)
                elif kind == "resize" and master >= 0:
                    size = struct.pack("HHHH", msg.resize.rows, msg.resize.cols, 0, 0)
                    fcntl.ioctl(master, termios.TIOCSWINSZ, size)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGWINCH)

        feeder = asyncio.ensure_future(feed())
        timed_out = False

        async def finish() -> None:
            nonlocal timed_out
            try:
                async with asyncio.timeout(start.timeout_seconds or None):
                    await proc.wait()
            except TimeoutError:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            await asyncio.gather(*readers)
            await out.put(None)

        finisher = asyncio.ensure_future(finish())
        try:
            while (msg := await out.get()) is not None:
                yield msg
            code = proc.returncode or 0
            sig = -code if code < 0 else 0
            yield io_pb2.ExecOutput(
                exited=io_pb2.ExecExited(
                    exit_code=128 + sig if sig else code, signal=sig, timed_out=timed_out
                )
            )
        finally:
            feeder.cancel()
            finisher.cancel()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                # Reaped before we leave, so no test ends with a child still running.
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(proc.wait(), 5)
            if master >= 0:
                loop.remove_reader(master)
                os.close(master)

    async def ListProcesses(self, request: io_pb2.ProcessesRequest, context: Any) -> Any:
        self.sandbox_ids.append(request.target.sandbox_id)
        return io_pb2.ProcessesResponse(
            processes=[io_pb2.ProcessInfo(pid=1, argv=["sleep", "inf"], running=True, main=True)]
        )

    # -- files -----------------------------------------------------------------------------
    async def FileOp(self, request: io_pb2.FileOpRequest, context: Any) -> Any:
        self.sandbox_ids.append(request.target.sandbox_id)
        path, host = request.path, self.host(request.path)
        try:
            if request.op == "stat":
                return io_pb2.FileOpResponse(entries=[self._entry(path)])
            if request.op == "list":
                entries = []
                depth = request.depth or 1
                for dirpath, dirnames, filenames in os.walk(host):
                    rel = Path(dirpath).relative_to(host)
                    if len(rel.parts) >= depth:
                        dirnames[:] = []
                        continue
                    for n in sorted(dirnames + filenames):
                        entries.append(self._entry(str(Path(path) / rel / n)))
                if not host.is_dir():
                    raise NotADirectoryError(path)
                return io_pb2.FileOpResponse(entries=entries)
            if request.op == "mkdir":
                existed = host.is_dir()
                host.mkdir(parents=request.recursive, exist_ok=True)
                return io_pb2.FileOpResponse(created=not existed)
            if request.op == "move":
                os.replace(host, self.host(request.destination))
                return io_pb2.FileOpResponse()
            if request.op == "remove":
                if host.is_dir() and not host.is_symlink():
                    shutil.rmtree(host) if request.recursive else host.rmdir()
                else:
                    host.unlink()
                return io_pb2.FileOpResponse()
            if request.op == "setattr":
                if request.HasField("mode"):
                    os.chmod(host, request.mode)
                if request.HasField("mtime"):
                    os.utime(host, (request.mtime, request.mtime))
                return io_pb2.FileOpResponse(entries=[self._entry(path)])
        except OSError as exc:
            await self._fail(context, exc, path)
        raise AssertionError(request.op)

    async def ReadFile(
        self, request: io_pb2.ReadFileRequest, context: Any
    ) -> AsyncIterator[io_pb2.FileChunk]:
        self.sandbox_ids.append(request.target.sandbox_id)
        try:
            f = open(self.host(request.path), "rb")  # noqa: SIM115
        except OSError as exc:
            await self._fail(context, exc, request.path)
            return
        with f:
            f.seek(request.offset)
            entry = self._entry(request.path)
            first = True
            while True:
                data = f.read(CHUNK)
                if not data and not first:
                    return
                yield io_pb2.FileChunk(entry=entry if first else None, data=data)
                first = False
                if not data:
                    return

    async def WriteFile(
        self, request_iterator: AsyncIterator[io_pb2.WriteFileInput], context: Any
    ) -> io_pb2.WriteFileResponse:
        requests = request_iterator.__aiter__()
        header = (await requests.__anext__()).header
        self.sandbox_ids.append(header.target.sandbox_id)
        host = self.host(header.path)
        try:
            if header.parents:
                host.parent.mkdir(parents=True, exist_ok=True)
            if host.is_dir():
                raise IsADirectoryError(header.path)
            tmp = host.with_name(f".{host.name}.part")
            with open(tmp, "wb") as f:
                async for msg in requests:
                    f.write(msg.data)
            os.chmod(tmp, header.mode if header.HasField("mode") else 0o644)
            if header.HasField("mtime"):
                os.utime(tmp, (header.mtime, header.mtime))
            os.replace(tmp, host)
        except OSError as exc:
            await self._fail(context, exc, header.path)
        return io_pb2.WriteFileResponse(entry=self._entry(header.path))

    async def Watch(self, request: io_pb2.WatchRequest, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "watch: not in the fake")
        yield  # pragma: no cover


@contextlib.contextmanager
def serve_agent(servicer: FakeAgentIo, socket_path: Path) -> Iterator[str]:
    """Serve on `unix:socket_path` from a private loop thread; yields the target."""

    def add(server: grpc.aio.Server) -> str:
        agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{socket_path}")
        return f"unix:{socket_path}"

    with serve_in_thread(add, name="fake agent") as target:
        yield target
