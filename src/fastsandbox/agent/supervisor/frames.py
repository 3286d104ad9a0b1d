"""Frames: `length: u32 BE | type: u8 | payload`, `length` counting the type byte.

A frame over the limit, an unknown type or a JSON payload that is not an object ends the
connection (`ProtocolError`); the peer is then not speaking our protocol and nothing it sends
afterwards can be trusted to be framed right.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

MAX_FRAME = 1024 * 1024 + 1
# DATA frames we send: the protocol allows 256 KiB; 64 KiB is what it calls typical.
DATA_CHUNK = 64 * 1024
MAX_DATA = 256 * 1024
_HEADER = struct.Struct(">IB")


class FrameType(IntEnum):
    JSON = 1
    DATA = 2
    STDOUT = 3
    STDERR = 4
    EOF = 5


class ProtocolError(Exception):
    """The peer broke the framing or the handshake; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes

    def json(self) -> dict[str, Any]:
        if self.type is not FrameType.JSON:
            raise ProtocolError(f"expected a JSON frame, got {self.type.name}")
        try:
            value = json.loads(self.payload)
        except ValueError as err:
            raise ProtocolError(f"malformed JSON frame: {err}") from None
        if not isinstance(value, dict):
            raise ProtocolError("a JSON frame must hold an object")
        return value


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None at a clean end of stream (between frames)."""
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError as err:
        if err.partial:
            raise ProtocolError("connection ended inside a frame header") from None
        return None
    (length,) = struct.unpack(">I", header)
    if length < 1 or length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} out of range (1..{MAX_FRAME})")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection ended inside a frame") from None
    try:
        kind = FrameType(body[0])
    except ValueError:
        raise ProtocolError(f"unknown frame type {body[0]}") from None
    return Frame(kind, body[1:])


def header(kind: FrameType, payload_len: int) -> bytes:
    return _HEADER.pack(payload_len + 1, kind)


def encode(kind: FrameType, payload: bytes = b"") -> bytes:
    return header(kind, len(payload)) + payload


def encode_json(value: dict[str, Any]) -> bytes:
    return encode(FrameType.JSON, json.dumps(value, separators=(",", ":")).encode())
