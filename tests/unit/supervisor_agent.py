"""A small asyncio stand-in for the agent's side of the supervisor channel (PROTOCOL.md).

It listens on `<dir>/agent.sock`, runs the handshake (mutual HMAC-SHA256 proofs), sends requests
on the control connection and hands out data connections by stream token. Used by the black-box
tests of `fsb-supervisor` and by `benchmarks/supervisor_exec.py`; the real agent client lives in
`fastsandbox.agent.supervisor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSON, DATA, STDOUT, STDERR, EOF = 1, 2, 3, 4, 5
MAX_LEN = (1 << 20) + 1
BOUND = 10.0  # seconds before a hung wait counts as a failure (never a speed assertion)


def proof(secret: bytes, label: str, nonce_hex: str) -> str:
    return hmac.new(secret, (label + nonce_hex).encode(), hashlib.sha256).hexdigest()


class Conn:
    """One framed connection (control or data)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> tuple[int, bytes] | None:
        """The next (type, payload), or None when the peer closed the connection."""
        try:
            head = await self.reader.readexactly(4)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            return None
        except ConnectionResetError:
            return None
        (length,) = struct.unpack(">I", head)
        assert 1 <= length <= MAX_LEN, length
        body = await self.reader.readexactly(length)
        return body[0], body[1:]

    async def read_json(self) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.read(), BOUND)
        assert frame is not None, "connection closed, expected a JSON frame"
        assert frame[0] == JSON, frame
        value: dict[str, Any] = json.loads(frame[1])
        return value

    def send(self, kind: int, payload: bytes = b"") -> None:
        self.writer.write(struct.pack(">IB", len(payload) + 1, kind) + payload)

    def send_json(self, value: dict[str, Any]) -> None:
        self.send(JSON, json.dumps(value).encode())

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()

    async def collect(self) -> Output:
        """Reads STDOUT/STDERR until the exit report, then expects the close."""
        out = Output()
        while True:
            frame = await asyncio.wait_for(self.read(), BOUND)
            assert frame is not None, f"closed before the exit report; got {out}"
            kind, payload = frame
            if kind == STDOUT:
                out.stdout += payload
            elif kind == STDERR:
                out.stderr += payload
            elif kind == JSON:
                out.exit = json.loads(payload)["exit"]
                assert await asyncio.wait_for(self.read(), BOUND) is None
                return out
            else:
                raise AssertionError(f"unexpected frame type {kind}")


@dataclass
class Output:
    stdout: bytes = b""
    stderr: bytes = b""
    exit: dict[str, Any] = field(default_factory=dict)


class FakeAgent:
    """Listens for one sandbox's supervisor. `secret` is what this agent believes the sandbox's
    secret is (a wrong one makes the supervisor's proof fail here); `lie` sends a wrong proof
    back (the supervisor must refuse it)."""

    def __init__(self, channel_dir: Path, secret: bytes, *, lie: bool = False) -> None:
        self.sock = channel_dir / "agent.sock"
        self.secret, self.lie = secret, lie
        self.hellos: list[dict[str, Any]] = []  # every supervisor hello, in order
        self.refused = 0
        self.lost = 0  # control connections the supervisor closed
        self.control: asyncio.Future[Conn] = asyncio.get_running_loop().create_future()
        self._server: asyncio.Server | None = None
        self._streams: dict[str, asyncio.Future[Conn]] = {}
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._conns: list[Conn] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FakeAgent:
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.sock))
        return self

    async def stop(self) -> None:
        """Like an agent process dying: the listener and every connection go away."""
        if self._server is not None:
            self._server.close()
        for c in self._conns:
            c.close()
        for c in self._conns:
            with contextlib.suppress(Exception):
                await c.writer.wait_closed()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer)
        self._conns.append(conn)
        nonce = secrets.token_hex(32)
        conn.send_json({"v": 1, "nonce": nonce})
        try:
            hello = await conn.read_json()
        except (AssertionError, asyncio.IncompleteReadError, ConnectionError):
            conn.close()
            return
        self.hellos.append(hello)
        good = hmac.compare_digest(hello.get("proof", ""), proof(self.secret, "sup:", nonce))
        token = hello.get("stream")
        fut = self._streams.get(token) if hello.get("role") == "data" else None
        if not good or (hello.get("role") == "data" and (fut is None or fut.done())):
            self.refused += 1
            why = "bad proof" if not good else "unknown stream"
            conn.send_json({"ok": False, "error": {"code": "EACCES", "message": why}})
            conn.close()
            return
        answer = proof(self.secret, "agent:", hello["nonce"])
        if self.lie:
            answer = proof(b"\0" * 32, "agent:", hello["nonce"])
        conn.send_json({"ok": True, "proof": answer})
        if hello["role"] == "control":
            if self.control.done():
                self.control = asyncio.get_running_loop().create_future()
            self.control.set_result(conn)
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self._read_replies(conn)
            finally:
                self._tasks.discard(task)
        elif fut is not None:
            fut.set_result(conn)

    async def _read_replies(self, conn: Conn) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while (frame := await conn.read()) is not None:
                reply = json.loads(frame[1])
                fut = self._replies.pop(reply["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
        self.lost += 1

    async def wait_control(self) -> Conn:
        return await asyncio.wait_for(asyncio.shield(self.control), BOUND)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Sends one request on the control connection and returns its reply."""
        conn = await self.wait_control()
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        conn.send_json({"id": rid, "op": op, **fields})
        await conn.drain()
        return await asyncio.wait_for(fut, BOUND)

    async def stream(self, op: str, **fields: Any) -> tuple[dict[str, Any], Conn | None]:
        """A streaming op: its reply and, when ok, the data connection the supervisor dials."""
        token = secrets.token_hex(16)
        fut: asyncio.Future[Conn] = asyncio.get_running_loop().create_future()
        self._streams[token] = fut
        reply = await self.request(op, stream=token, **fields)
        if not reply["ok"]:
            return reply, None
        return reply, await asyncio.wait_for(fut, BOUND)

    async def run(self, argv: list[str], **fields: Any) -> Output:
        """exec with stdin closed at once; the whole output and the exit report."""
        fields.setdefault("env", [f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}"])
        reply, conn = await self.stream("exec", argv=argv, **fields)
        assert reply["ok"], reply
        assert conn is not None
        conn.send(EOF)
        out = await conn.collect()
        conn.close()
        return out
