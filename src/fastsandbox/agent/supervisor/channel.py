"""One sandbox's channel: a unix listener in `<agent state>/channels/<id>/`, the control
connection its supervisor dials, and the data connections it dials for each stream.

Why it is shaped this way:
- The agent listens and the supervisor dials (PROTOCOL.md): under runsc a sandbox can connect
  to a host socket but cannot offer one. One listener per sandbox means the listener that
  accepted a connection says which sandbox it came from.
- `sun_path` holds 108 bytes and a state dir can be deep, so the socket is bound through
  `/proc/self/fd/<dir fd>/agent.sock`, which is short whatever the directory's path.
- Control requests carry ids and replies may come in any order: each request waits on its own
  future, so a slow operation never holds up another. A control connection that drops fails
  the requests it carried with `Unavailable`; the supervisor redials and later calls succeed.
- A stream token is single use: it is registered before the request that names it is sent and
  removed when its data connection arrives (or the request fails), so a connection with an
  unknown or used token is refused.
- Waiting for a supervisor that has not dialled yet (just after create, or after an agent
  restart) is bounded; then `Unavailable` names the sandbox.
- A stream's dial and handshake are taken off its path: once a channel has carried a stream,
  it keeps SPARES data connections parked (`park`, PROTOCOL.md) — dialled and proven by the
  same handshake, each under a single-use token of its own — and the next stream names one of
  them (a warm slot parks its SPARES before it is claimed: `park`). A supervisor without
  `park` (older) dials per stream as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastsandbox.agent.supervisor.errors import translate
from fastsandbox.agent.supervisor.frames import (
    Frame,
    FrameType,
    ProtocolError,
    encode_json,
    header,
    read_frame,
)
from fastsandbox.agent.supervisor.handshake import accept
from fastsandbox.errors import FsbError, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
# How long a call waits for the supervisor to (re)dial before reporting Unavailable.
CONNECT_WAIT_SECONDS = 10.0
# How long a stream waits for its data connection after a successful reply.
DATA_WAIT_SECONDS = 10.0
# A reply slower than this means a wedged supervisor (a cross-filesystem move of a big tree
# is the slowest honest case).
REPLY_SECONDS = 300.0
_READ_LIMIT = 512 * 1024
# Parked data connections per channel (each one descriptor here and one in the supervisor):
# two let back-to-back streams each find one while the last one used is replaced.
SPARES = 2


class DataConnection:
    """One stream's connection: frames both ways, with the kernel's flow control."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.closed = asyncio.Event()
        self.on_close: Callable[[], None] | None = None

    @property
    def usable(self) -> bool:
        """Open on both ends as far as we know (a parked one the supervisor dropped reads EOF)."""
        return not self.closed.is_set() and not self._reader.at_eof()

    async def recv(self) -> Frame | None:
        """The next frame; None when the supervisor closed the stream."""
        try:
            return await read_frame(self._reader)
        except (ConnectionError, ProtocolError) as err:
            log.debug("data connection ended", extra={"err": str(err)})
            return None

    async def send(self, kind: FrameType, payload: bytes | memoryview = b"") -> None:
        # Header and payload written apart: no copy of the payload just to prefix it.
        self._writer.write(header(kind, len(payload)))
        if payload:
            self._writer.write(payload)
        await self._writer.drain()

    async def send_json(self, value: dict[str, Any]) -> None:
        self._writer.write(encode_json(value))
        await self._writer.drain()

    async def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        if self.on_close is not None:
            self.on_close()
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


class _Control:
    def __init__(
        self, sandbox_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.sandbox_id = sandbox_id
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 1
        self.lost = False
        self._lock = asyncio.Lock()

    async def request(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        if self.lost:
            raise self._lost_error()
        rid = self.next_id
        self.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        try:
            async with self._lock:
                self.writer.write(encode_json({"id": rid, "op": op, **fields}))
                await self.writer.drain()
            async with asyncio.timeout(REPLY_SECONDS):
                reply = await future
        except (ConnectionError, OSError):
            raise self._lost_error() from None
        except TimeoutError:
            raise Unavailable(
                f"the supervisor of sandbox {self.sandbox_id} did not answer {op} "
                f"within {REPLY_SECONDS:.0f}s"
            ) from None
        finally:
            self.pending.pop(rid, None)
        if reply.get("ok") is not True:
            raise translate(reply.get("error"), self.sandbox_id)
        return reply

    def _lost_error(self) -> Unavailable:
        return Unavailable(
            f"lost the connection to the supervisor of sandbox {self.sandbox_id}; retry"
        )

    async def serve(self) -> None:
        """Route replies to their requests until the connection ends."""
        try:
            while (frame := await read_frame(self.reader)) is not None:
                reply = frame.json()
                future = self.pending.get(reply.get("id", -1))
                if future is not None and not future.done():
                    future.set_result(reply)
        except (ConnectionError, ProtocolError) as err:
            log.warning(
                "control connection broken", extra={"sandbox_id": self.sandbox_id, "err": str(err)}
            )
        finally:
            self.lose()

    def lose(self) -> None:
        if self.lost:
            return
        self.lost = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(self._lost_error())
        self.writer.close()


class Channel:
    """The listener and connections of one sandbox. `start()` binds, `close()` unbinds."""

    def __init__(self, sandbox_id: str, directory: Path, secret: bytes) -> None:
        self.sandbox_id = sandbox_id
        self.directory = directory
        self.secret = secret
        self.supervisor_version = ""
        self._server: asyncio.AbstractServer | None = None
        self._control: _Control | None = None
        self._connected = asyncio.Event()
        self._streams: dict[str, asyncio.Future[DataConnection]] = {}
        # Open data connections, closed with the channel (an agent shutting down).
        self._open: set[DataConnection] = set()
        self._closing: set[asyncio.Task[None]] = set()
        # Parked data connections: (token, connection, the control connection it was parked
        # under — the supervisor drops its parked ones when that one is lost).
        self._spares: list[tuple[str, DataConnection, _Control]] = []
        self._park = True  # False once the supervisor says it has no `park`
        self._parking: asyncio.Task[None] | None = None
        # Every accepted connection until its handler ends (a handshake in progress too): closed
        # with the channel, so none outlives it (a supervisor parks data connections at any time).
        self._accepted: set[asyncio.StreamWriter] = set()
        self._closed = False

    @property
    def socket_path(self) -> Path:
        return self.directory / SOCKET_NAME

    @property
    def connected(self) -> bool:
        return self._control is not None and not self._control.lost

    async def start(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        sock = _bind_short(self.directory)
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect, sock=sock, limit=_READ_LIMIT
            )
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._accepted):
            writer.close()
        if self._control is not None:
            self._control.lose()
        if self._parking is not None:
            self._parking.cancel()
        self._spares.clear()  # closed below with every open connection
        for future in self._streams.values():
            if not future.done():
                future.set_exception(Unavailable(f"sandbox {self.sandbox_id}: channel closed"))
        self._streams.clear()
        for conn in list(self._open):
            await conn.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    # -- calls ------------------------------------------------------------------------------
    async def control(self, wait: float = CONNECT_WAIT_SECONDS) -> _Control:
        if self._control is not None and not self._control.lost:
            return self._control
        try:
            async with asyncio.timeout(wait):
                while self._control is None or self._control.lost:
                    self._connected.clear()
                    await self._connected.wait()
        except TimeoutError:
            raise Unavailable(
                f"the supervisor of sandbox {self.sandbox_id} is not connected (waited "
                f"{wait:.0f}s): it may still be starting, or PID 1 is not fsb-supervisor"
            ) from None
        return self._control

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        control = await self.control()
        return await control.request(op, fields)

    async def open_stream(self, op: str, **fields: Any) -> tuple[dict[str, Any], DataConnection]:
        """Send a streaming request; its reply and its data connection (a parked one, or the
        one the supervisor dials for it)."""
        spare = self._take_spare()
        token = spare[0] if spare is not None else secrets.token_hex(16)
        future: asyncio.Future[DataConnection] = asyncio.get_running_loop().create_future()
        # Registered even for a parked token: a supervisor that no longer holds it (it lost
        # our control connection in between) dials one for it instead.
        self._streams[token] = future
        try:
            reply = await self.request(op, stream=token, **fields)
            if spare is not None and reply.get("parked") is True:
                self._streams.pop(token, None)
                conn = spare[1]
            else:
                if spare is not None:
                    await spare[1].close()
                    spare = None
                try:
                    async with asyncio.timeout(DATA_WAIT_SECONDS):
                        conn = await future
                except TimeoutError:
                    raise Unavailable(
                        f"the supervisor of sandbox {self.sandbox_id} did not open the stream "
                        f"of {op} within {DATA_WAIT_SECONDS:.0f}s"
                    ) from None
        except BaseException as exc:
            self._streams.pop(token, None)
            if future.done() and not future.cancelled() and future.exception() is None:
                await future.result().close()
            if spare is not None:
                # Refused by the supervisor (a bad path, a failed exec): it kept the parked
                # connection, so it stays ours to use. Anything else: not known, so drop it.
                if isinstance(exc, FsbError) and not isinstance(exc, Unavailable):
                    self._spares.append(spare)
                else:
                    await spare[1].close()
            raise
        conn.on_close = self._refill_soon
        return reply, conn

    # -- parked data connections ------------------------------------------------------------
    def _take_spare(self) -> tuple[str, DataConnection, _Control] | None:
        while self._spares:
            spare = self._spares.pop()
            if spare[2] is self._control and not spare[2].lost and spare[1].usable:
                return spare
            self._close_later(spare[1])
        return None

    def _close_later(self, conn: DataConnection) -> None:
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def park(self) -> None:
        """Park SPARES data connections now, before any stream has run: a warm slot does it
        while it waits, so the first exec of the sandbox that claims it dials nothing (that
        dial and handshake made a first `commands.run` ≈ 2 ms slower than the next)."""
        self._refill_soon()
        parking = self._parking
        if parking is not None:
            await asyncio.shield(parking)

    def _refill_soon(self) -> None:
        """After a stream ends (never on a stream's own path): park up to SPARES again."""
        if not self._park or self._parking is not None or self._server is None:
            return
        if len(self._spares) >= SPARES or not self.connected:
            return
        self._parking = asyncio.get_running_loop().create_task(self._refill())

    async def _refill(self) -> None:
        try:
            while self._park and len(self._spares) < SPARES:
                control = self._control
                if control is None or control.lost:
                    return
                token = secrets.token_hex(16)
                future: asyncio.Future[DataConnection] = asyncio.get_running_loop().create_future()
                self._streams[token] = future
                try:
                    await control.request("park", {"stream": token})
                    async with asyncio.timeout(DATA_WAIT_SECONDS):
                        conn = await future
                except InvalidArgument:
                    self._park = False  # an older supervisor: "unknown op"
                    return
                except (FsbError, TimeoutError) as err:
                    log.debug(
                        "could not park a data connection",
                        extra={"sandbox_id": self.sandbox_id, "err": str(err)},
                    )
                    return
                finally:
                    self._streams.pop(token, None)
                if control is not self._control or control.lost:
                    await conn.close()
                    return
                self._spares.append((token, conn, control))
        finally:
            self._parking = None

    # -- connections ------------------------------------------------------------------------
    def _stream_waiting(self, token: str) -> bool:
        future = self._streams.get(token)
        return future is not None and not future.done()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:  # accepted just before the listener closed
            writer.close()
            return
        self._accepted.add(writer)
        try:
            await self._serve_connection(reader, writer)
        finally:
            self._accepted.discard(writer)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            hello = await accept(
                reader,
                writer,
                sandbox_id=self.sandbox_id,
                secret=self.secret,
                stream_known=self._stream_waiting,
            )
        except (ProtocolError, ConnectionError, TimeoutError) as err:
            log.warning(
                "refused a channel connection",
                extra={"sandbox_id": self.sandbox_id, "err": str(err) or type(err).__name__},
            )
            writer.close()
            return
        if hello.role == "control":
            await self._serve_control(reader, writer, hello.version)
            return
        future = self._streams.pop(hello.stream, None)
        if future is None or future.done():
            log.warning(
                "refused a data connection with an unknown or used stream token",
                extra={"sandbox_id": self.sandbox_id},
            )
            writer.close()
            return
        conn = DataConnection(reader, writer)
        future.set_result(conn)
        self._open.add(conn)
        # The connection belongs to the stream's user now; this handler only outlives it so
        # that the server never closes it underneath.
        try:
            await conn.closed.wait()
        finally:
            self._open.discard(conn)

    async def _serve_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: str
    ) -> None:
        if self._control is not None:
            self._control.lose()  # a redial means the old connection is dead to the supervisor
        control = _Control(self.sandbox_id, reader, writer)
        self._control = control
        stale, self._spares = self._spares, []  # parked under the lost control connection
        for _, conn, _ in stale:
            self._close_later(conn)
        self.supervisor_version = version
        self._connected.set()
        log.info(
            "supervisor connected",
            extra={"sandbox_id": self.sandbox_id, "supervisor_version": version},
        )
        await control.serve()


def _bind_short(directory: Path) -> socket.socket:
    """A listening socket at `directory/agent.sock`, bound through a short /proc path; a
    stale socket from an earlier agent is replaced."""
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCKET_NAME, dir_fd=dirfd)
        sock.bind(f"/proc/self/fd/{dirfd}/{SOCKET_NAME}")
        os.chmod(SOCKET_NAME, 0o600, dir_fd=dirfd)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dirfd)
    return sock
