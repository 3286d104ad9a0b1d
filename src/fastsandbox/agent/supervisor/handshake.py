"""The channel's secrets and handshake (PROTOCOL.md "Handshake").

One random agent key, kept owner-only in the agent's state directory, derives every sandbox's
secret as HMAC-SHA256(key, sandbox id): a restarted agent knows every secret again without
storing one per sandbox. The secret travels to PID 1 once, in its environment; on the wire only
proofs over fresh nonces travel, so a recorded handshake cannot be replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastsandbox.agent.supervisor.frames import ProtocolError, encode_json, read_frame

VERSION = 1
KEY_BYTES = 32
HANDSHAKE_SECONDS = 5.0


def load_or_create_key(path: Path) -> bytes:
    """The agent key at `path`, made (0600, atomically) when absent."""
    with contextlib.suppress(FileNotFoundError):
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise ProtocolError(f"agent key {path} is {len(key)} bytes, not {KEY_BYTES}")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(KEY_BYTES))
    finally:
        os.close(fd)
    try:
        # link, not rename: two agents racing on one state dir keep the first key.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return load_or_create_key(path)


def sandbox_secret(key: bytes, sandbox_id: str) -> bytes:
    return hmac.new(key, sandbox_id.encode(), hashlib.sha256).digest()


def proof(secret: bytes, side: str, nonce_hex: str) -> str:
    """`side` is "sup" or "agent": each side proves itself over the other side's nonce."""
    return hmac.new(secret, f"{side}:{nonce_hex}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Hello:
    role: str
    stream: str
    version: str


async def accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    sandbox_id: str,
    secret: bytes,
    stream_known: Callable[[str], bool],
) -> Hello:
    """Run the agent's half of the handshake; ProtocolError when the peer fails it (the
    caller closes the connection). A data connection must name a stream we issued."""
    nonce = secrets.token_hex(32)
    writer.write(encode_json({"v": VERSION, "nonce": nonce}))
    await writer.drain()
    async with asyncio.timeout(HANDSHAKE_SECONDS):
        frame = await read_frame(reader)
    if frame is None:
        raise ProtocolError("closed before its hello")
    hello = frame.json()
    role, stream, sup_nonce = hello.get("role"), hello.get("stream", ""), hello.get("nonce")
    given = hello.get("proof")
    problem = ""
    if hello.get("v") != VERSION:
        problem = f"protocol version {hello.get('v')!r}, expected {VERSION}"
    elif role not in ("control", "data") or not isinstance(stream, str):
        problem = f"unknown role {role!r}"
    elif hello.get("sandbox") != sandbox_id:
        problem = f"hello names sandbox {hello.get('sandbox')!r}, this channel is {sandbox_id}"
    elif not isinstance(sup_nonce, str) or not isinstance(given, str):
        problem = "hello lacks nonce or proof"
    elif not hmac.compare_digest(given, proof(secret, "sup", nonce)):
        problem = "wrong proof (not this sandbox's supervisor)"
    elif role == "data" and not stream_known(stream):
        problem = "unknown or used stream token"
    if problem:
        writer.write(encode_json({"ok": False, "error": {"code": "EPERM", "message": problem}}))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        raise ProtocolError(problem)
    assert isinstance(sup_nonce, str) and isinstance(role, str)
    writer.write(encode_json({"ok": True, "proof": proof(secret, "agent", sup_nonce)}))
    await writer.drain()
    return Hello(role=role, stream=stream, version=str(hello.get("version", "")))
