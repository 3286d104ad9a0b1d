"""The Exec stream's messages (proto/fastsandbox/v1/io.proto) in protobuf's wire format, written
out by hand for the lean client: the generated classes cost more start-up than the whole rest
of `fsb exec`. Field numbers are io.proto's; tests/unit/test_cli_wire.py encodes with these and
parses with the generated classes (and back), so a drift between the two fails there.
Unknown fields are skipped, as protobuf does, so a server with newer fields still works.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int32/int64 negatives: ten bytes of two's complement
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes(field: int, data: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(data)) + data


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode()) if text else b""


def _uint(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value) if value else b""


def term_size(cols: int, rows: int) -> bytes:
    return _uint(1, cols) + _uint(2, rows)


def exec_start(
    namespace: str,
    name: str,
    argv: Sequence[str],
    *,
    env: Sequence[tuple[str, str]] = (),
    cwd: str = "",
    user: str = "",
    pty: tuple[int, int] | None = None,
    stdin: bool = False,
    timeout: float = 0.0,
    tag: str = "",
) -> bytes:
    """`ExecInput{start: ExecStart{...}}`."""
    start = bytearray(_bytes(1, _str(1, namespace) + _str(2, name)))
    for word in argv:
        start += _bytes(2, word.encode())
    for key, value in env:
        start += _bytes(3, _str(1, key) + _str(2, value))
    start += _str(4, cwd) + _str(5, user)
    if pty is not None:
        start += _bytes(6, term_size(*pty))
    start += _uint(7, int(stdin))
    if timeout:
        start += _key(8, _I64) + struct.pack("<d", timeout)
    start += _str(9, tag)
    return _bytes(1, bytes(start))


def stdin_data(data: bytes) -> bytes:
    return _bytes(2, data)


def close_stdin() -> bytes:
    return _key(3, _VARINT) + b"\x01"


def signal(signum: int) -> bytes:
    return _key(4, _VARINT) + _varint(signum)


def resize(cols: int, rows: int) -> bytes:
    return _bytes(5, term_size(cols, rows))


class WireError(Exception):
    """A message that is not valid protobuf."""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) for each field: an int for varints, bytes for the rest."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        value: int | bytes
        if wire == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise WireError("truncated field")
            value, pos = data[pos : pos + size], pos + size
        elif wire == _I64:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == _I32:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise WireError(f"wire type {wire} is not supported")
        if pos > len(data):
            raise WireError("truncated field")
        out.append((field, value))
    return out


def _int32(value: int | bytes) -> int:
    if not isinstance(value, int):
        raise WireError("expected a varint")
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


class Output:
    """One `ExecOutput`: `kind` is started | stdout | stderr | exited | "" (a newer kind)."""

    __slots__ = ("data", "exit_code", "kind", "pid", "signal", "timed_out")

    def __init__(self) -> None:
        self.kind = ""
        self.data = b""
        self.pid = 0
        self.exit_code = 0
        self.signal = 0
        self.timed_out = False


def exec_output(message: bytes) -> Output:
    out = Output()
    for field, value in fields(message):
        if field in (2, 3) and isinstance(value, bytes):
            out.kind, out.data = ("stdout" if field == 2 else "stderr"), value
        elif field == 1 and isinstance(value, bytes):
            out.kind = "started"
            out.pid = 0
            for sub, v in fields(value):
                if sub == 1:
                    out.pid = _int32(v)
        elif field == 4 and isinstance(value, bytes):
            out.kind = "exited"
            out.exit_code, out.signal, out.timed_out = 0, 0, False
            for sub, v in fields(value):
                if sub == 1:
                    out.exit_code = _int32(v)
                elif sub == 2:
                    out.signal = _int32(v)
                elif sub == 3:
                    out.timed_out = bool(_int32(v))
    return out


# ------------------------------------------------------------------ Create (fastpath.proto)


def _packed(field: int, values: Sequence[int]) -> bytes:
    return _bytes(field, b"".join(_varint(v) for v in values)) if values else b""


def create_request(
    *,
    namespace: str,
    name: str,
    image: str,
    command: Sequence[str] = (),
    args: Sequence[str] = (),
    env: Sequence[tuple[str, str]] = (),
    working_dir: str = "",
    ports: Sequence[int] = (),
    pool: str = "",
    ttl_seconds: int = 0,
    resources: tuple[str, str, int, str] | None = None,
    labels: Sequence[tuple[str, str]] = (),
    mode: str = "",
    idempotency_key: str = "",
) -> bytes:
    """`CreateRequest`; `resources` is (cpu, memory, pids, disk), sent (even empty) when given."""
    out = bytearray(_str(1, namespace) + _str(2, name) + _str(3, image))
    for word in command:
        out += _bytes(4, word.encode())
    for word in args:
        out += _bytes(5, word.encode())
    for key, value in env:
        out += _bytes(6, _str(1, key) + _str(2, value))
    out += _str(7, working_dir) + _packed(8, ports) + _str(9, pool) + _uint(11, ttl_seconds)
    if resources is not None:
        cpu, memory, pids, disk = resources
        out += _bytes(15, _str(1, cpu) + _str(2, memory) + _uint(3, pids) + _str(4, disk))
    for key, value in labels:
        out += _bytes(16, _str(1, key) + _str(2, value))
    out += _str(17, mode) + _str(18, idempotency_key)
    return bytes(out)


_TIMINGS = ("acceptedMs", "scheduledMs", "runtimeReadyMs", "scaledMs", "pulledMs")


def create_response(message: bytes) -> dict[str, object]:
    """`CreateResponse` as a dict: its string fields by proto name, `endpoints` a list,
    `timings` {acceptedMs...: float} (proto3: 0 when unset)."""
    text = {1: "name", 2: "namespace", 3: "uid", 4: "container_id", 5: "agent", 6: "agent_ip",
            9: "phase", 10: "object_json"}  # fmt: skip
    out: dict[str, object] = {k: "" for k in text.values()}
    endpoints: list[str] = []
    timings = dict.fromkeys(_TIMINGS, 0.0)
    for field, value in fields(message):
        if not isinstance(value, bytes):
            continue
        if field in text:
            out[text[field]] = value.decode("utf-8", "replace")
        elif field == 7:
            endpoints.append(value.decode("utf-8", "replace"))
        elif field == 8:
            for sub, v in fields(value):
                if 1 <= sub <= len(_TIMINGS) and isinstance(v, bytes) and len(v) == 8:
                    timings[_TIMINGS[sub - 1]] = struct.unpack("<d", v)[0]
    out["endpoints"] = endpoints
    out["timings"] = timings
    return out
