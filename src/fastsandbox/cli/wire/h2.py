"""One gRPC call over HTTP/2 (RFC 9113) on a plain or TLS socket, driven by the caller's
`select` loop: the lean client `fsb exec` uses so that it does not pay grpc's start-up.

It is the same protocol grpc speaks, not a second one: the same request headers (`:path`
/fastsandbox.v1.FastPath/Exec, `content-type: application/grpc`, `te: trailers`, the
`authorization` metadata), the same length-prefixed messages, the status read from the
trailers (`grpc-status`, `grpc-message`, `retry-after`) and turned into our errors by the one
seam the SDK uses (`sdk/_resolve.translate_status`). One stream (id 1) per connection; flow
control both ways; PING, SETTINGS, GOAWAY and RST_STREAM as the protocol requires.
"""

from __future__ import annotations

import os
import socket
import struct

from fastsandbox.cli.wire.hpack import Decoder, HpackError, encode
from fastsandbox.errors import STATUS_NAMES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = (
    0,
    1,
    3,
    4,
    5,
    6,
    7,
    8,
)
CONTINUATION = 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY = 0x4, 0x8, 0x20
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM = 1
# Our receive window, per stream and for the connection: large, so output streams without a
# WINDOW_UPDATE round trip; backpressure still holds (we stop reading while stdout blocks).
WINDOW = 1 << 24
_DEFAULT_WINDOW = 65535
_SETTINGS_INITIAL_WINDOW, _SETTINGS_MAX_FRAME, _SETTINGS_ENABLE_PUSH = 0x4, 0x5, 0x2
# RST_STREAM / GOAWAY error codes -> gRPC status, as gRPC's HTTP/2 mapping has them.
_RESET_STATUS = {
    7: "UNAVAILABLE",
    8: "CANCELLED",
    11: "RESOURCE_EXHAUSTED",
    12: "PERMISSION_DENIED",
}
# HTTP status -> gRPC status, for an answer that is not gRPC's (a proxy's, say).
_HTTP_STATUS = {
    "400": "INTERNAL", "401": "UNAUTHENTICATED", "403": "PERMISSION_DENIED",
    "404": "UNIMPLEMENTED", "429": "UNAVAILABLE", "502": "UNAVAILABLE", "503": "UNAVAILABLE",
    "504": "UNAVAILABLE",
}  # fmt: skip


class CallError(Exception):
    """The call failed (or the connection did): a gRPC status name, details, trailers."""

    def __init__(self, status: str, details: str, trailing: Sequence[tuple[str, str]] = ()):
        super().__init__(f"{status}: {details}")
        self.status = status
        self.details = details
        self.trailing = list(trailing)


def target(endpoint: str) -> tuple[int, str | tuple[str, int], str] | None:
    """(address family, address, :authority) for a grpc target string; None for the forms
    only grpc knows (`dns://AUTHORITY/...`, `unix-abstract:`, `xds:`...), which the caller
    leaves to grpc."""
    if endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
        if path.startswith("//"):
            if not path.startswith("///"):
                return None  # unix://authority/path: not a form we need
            path = path[2:]
        return (socket.AF_UNIX, path, "localhost") if path else None
    rest = endpoint
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        if rest.startswith(prefix):
            rest = rest[len(prefix) :]
            break
    if "://" in rest or rest.startswith("dns:") or "," in rest or not rest:
        return None
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]")
        port = port.removeprefix(":") if sep else ""
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    elif ":" in rest:
        host, port = rest, ""  # a bare IPv6 address
    else:
        host, port = rest, ""
    if not port:
        port = "443"  # grpc's default for a target without one
    if not port.isdigit() or not host:
        return None
    return (socket.AF_INET, (host, int(port)), rest if rest.count(":") <= 1 else f"[{host}]:{port}")


def _grpc_roots() -> str | None:
    """The roots grpc trusts by default (its env override, else the bundle it ships), so a
    server with a public certificate is trusted by exactly what grpc would trust."""
    named = os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
    if named:
        return named
    import importlib.util

    spec = importlib.util.find_spec("grpc")
    for base in (spec.submodule_search_locations or []) if spec else []:
        bundle = os.path.join(base, "_cython", "_credentials", "roots.pem")
        if os.path.isfile(bundle):
            return bundle
    return None


def connect(endpoint: str, *, tls: bool, ca_pem: bytes | None, timeout: float) -> socket.socket:
    """A connected socket to `endpoint` (TLS with ALPN h2 when `tls`); OSError (ssl.SSLError
    included) when nothing answers there."""
    where = target(endpoint)
    if where is None:
        raise ValueError(f"{endpoint}: not a target the lean client knows")
    family, address, _ = where
    if family == socket.AF_UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    else:
        assert isinstance(address, tuple)
        host, port = address
        # An ASCII name as bytes: a str would be IDNA-encoded first, importing unicodedata.
        sock = socket.create_connection(
            (host.encode() if host.isascii() else host, port),  # type: ignore[arg-type]
            timeout=timeout,
        )  # (getaddrinfo takes bytes; typeshed says str)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if ca_pem is not None:
            ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        else:
            roots = _grpc_roots()
            if roots:
                ctx.load_verify_locations(cafile=roots)
            else:
                ctx.load_default_certs()
        ctx.set_alpn_protocols(["h2"])
        host = address[0] if isinstance(address, tuple) else "localhost"
        try:
            sock = ctx.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
    sock.settimeout(None)
    return sock


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _percent_decoded(text: str) -> str:
    """grpc-message is percent-encoded UTF-8 (the gRPC HTTP/2 spec)."""
    if "%" not in text:
        return text
    raw = text.encode()
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25 and i + 2 < len(raw):
            try:
                out.append(int(raw[i + 1 : i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(raw[i])
        i += 1
    return out.decode("utf-8", "replace")


class Call:
    """One client-streaming/server-streaming call on stream 1 of a fresh connection.

    `send` queues a message (flushed as the peer's windows allow), `receive` reads what the
    socket has and returns the messages that completed; once `ended`, `status()` says how.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        authority: str,
        path: str,
        metadata: Sequence[tuple[str, str]],
        tls: bool,
    ) -> None:
        self.sock = sock
        self._decoder = Decoder()
        self._in = bytearray()
        self._messages = bytearray()
        self._out = bytearray()
        self._send_conn = self._send_stream = self._peer_initial = _DEFAULT_WINDOW
        self._peer_max_frame = 16384
        self._unacked_conn = self._unacked_stream = 0
        self._block: bytearray | None = None  # a header block awaiting CONTINUATION
        self._block_ends = False
        self.headers: list[tuple[str, str]] | None = None
        self.trailers: list[tuple[str, str]] | None = None
        self.ended = False
        self._reset: CallError | None = None
        self._half_close = False  # END_STREAM once everything queued is sent
        self._half_closed = False
        settings = struct.pack(">HI", _SETTINGS_ENABLE_PUSH, 0) + struct.pack(
            ">HI", _SETTINGS_INITIAL_WINDOW, WINDOW
        )
        block = encode(
            [
                (":method", "POST"), (":scheme", "https" if tls else "http"), (":path", path),
                (":authority", authority), ("content-type", "application/grpc"),
                ("te", "trailers"), ("user-agent", "fsb-exec"), *metadata,
            ]
        )  # fmt: skip
        self.sock.sendall(
            PREFACE
            + _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", WINDOW - _DEFAULT_WINDOW))
            + _frame(HEADERS, END_HEADERS, STREAM, block)
        )

    # ------------------------------------------------------------------ sending

    def send(self, message: bytes) -> None:
        self._out += b"\x00" + struct.pack(">I", len(message)) + message
        self.flush()

    def close_send(self) -> None:
        """No more messages from us (a unary call's request is complete)."""
        self._half_close = True
        self.flush()

    def pending(self) -> int:
        """Bytes queued that the peer's flow-control windows do not take yet."""
        return len(self._out)

    def flush(self) -> None:
        frames = bytearray()
        while self._out and not self.ended:
            size = min(len(self._out), self._send_conn, self._send_stream, self._peer_max_frame)
            if size <= 0:
                break
            frames += _frame(DATA, 0, STREAM, bytes(self._out[:size]))
            del self._out[:size]
            self._send_conn -= size
            self._send_stream -= size
        if self._half_close and not self._out and not self._half_closed and not self.ended:
            frames += _frame(DATA, END_STREAM, STREAM)
            self._half_closed = True
        if frames:
            self.sock.sendall(frames)

    def cancel(self) -> None:
        """End the stream from our side (CANCEL), unless the server already ended it."""
        if not self.ended:
            self.ended = True
            try:  # noqa: SIM105 (contextlib is an import `fsb exec` does without)
                self.sock.sendall(_frame(RST_STREAM, 0, STREAM, struct.pack(">I", 8)))
            except OSError:
                pass

    # ------------------------------------------------------------------ receiving

    def buffered(self) -> bool:
        """Data already read off the wire (TLS) that `select` would not report."""
        pending = getattr(self.sock, "pending", None)
        return bool(pending and pending())

    def receive(self) -> list[bytes]:
        """Read once from the socket; the messages completed by what came."""
        try:
            data = self.sock.recv(256 * 1024)
        except OSError as exc:
            raise CallError("UNAVAILABLE", f"connection to the server lost: {exc}") from None
        if not data:
            if self.ended:
                return []
            raise CallError("UNAVAILABLE", "the server closed the connection")
        self._in += data
        out: list[bytes] = []
        replies = bytearray()
        while len(self._in) >= 9:
            length = int.from_bytes(self._in[:3], "big")
            if len(self._in) < 9 + length:
                break
            kind, flags = self._in[3], self._in[4]
            stream = int.from_bytes(self._in[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self._in[9 : 9 + length])
            del self._in[: 9 + length]
            replies += self._on_frame(kind, flags, stream, payload, out)
        if self._unacked_conn >= WINDOW // 2:
            replies += _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._unacked_conn))
            self._unacked_conn = 0
        if self._unacked_stream >= WINDOW // 2 and not self.ended:
            replies += _frame(WINDOW_UPDATE, 0, STREAM, struct.pack(">I", self._unacked_stream))
            self._unacked_stream = 0
        if replies:
            try:  # noqa: SIM105 (no contextlib: see above)
                self.sock.sendall(replies)
            except OSError:
                pass  # the read side reports the loss
        self.flush()
        return out

    def _on_frame(
        self, kind: int, flags: int, stream: int, payload: bytes, out: list[bytes]
    ) -> bytes:
        if kind == DATA and stream == STREAM:
            self._unacked_conn += len(payload)
            self._unacked_stream += len(payload)
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            self._messages += payload
            self._split(out)
            if flags & END_STREAM:
                self.ended = True
        elif kind == DATA:
            self._unacked_conn += len(payload)
        elif kind in (HEADERS, CONTINUATION) and stream == STREAM:
            if kind == HEADERS:
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & PRIORITY:
                    payload = payload[5:]
                self._block, self._block_ends = bytearray(), bool(flags & END_STREAM)
            if self._block is None:
                raise CallError("INTERNAL", "HTTP/2: CONTINUATION without HEADERS")
            self._block += payload
            if flags & END_HEADERS:
                self._on_headers(bytes(self._block), self._block_ends)
                self._block = None
        elif kind == RST_STREAM and stream == STREAM:
            code = int.from_bytes(payload[:4], "big")
            self.ended = True
            self._reset = CallError(
                _RESET_STATUS.get(code, "INTERNAL"),
                f"stream reset by the server (HTTP/2 code {code})",
            )
        elif kind == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - 5, 6):
                key, value = struct.unpack(">HI", payload[i : i + 6])
                if key == _SETTINGS_INITIAL_WINDOW:
                    self._send_stream += value - self._peer_initial
                    self._peer_initial = value
                elif key == _SETTINGS_MAX_FRAME:
                    self._peer_max_frame = value
            return _frame(SETTINGS, ACK, 0)
        elif kind == PING and not flags & ACK:
            return _frame(PING, ACK, 0, payload)
        elif kind == GOAWAY:
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if last < STREAM and not self.ended:
                raise CallError("UNAVAILABLE", "the server is going away and did not take the call")
        elif kind == WINDOW_UPDATE:
            grant = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if stream == 0:
                self._send_conn += grant
            elif stream == STREAM:
                self._send_stream += grant
        elif kind == PUSH_PROMISE:
            raise CallError("INTERNAL", "HTTP/2: the server pushed though push is disabled")
        return b""

    def _on_headers(self, block: bytes, ends: bool) -> None:
        try:
            headers = self._decoder.decode(block)
        except HpackError as exc:
            raise CallError("INTERNAL", f"HTTP/2 header block: {exc}") from None
        if self.headers is None and not (ends and any(k == "grpc-status" for k, _ in headers)):
            self.headers = headers
        elif self.headers is None:
            self.headers = self.trailers = headers  # trailers-only: the status and nothing else
        else:
            self.trailers = headers
        if ends:
            self.ended = True

    def _split(self, out: list[bytes]) -> None:
        while len(self._messages) >= 5:
            size = int.from_bytes(self._messages[1:5], "big")
            if len(self._messages) < 5 + size:
                return
            if self._messages[0]:
                raise CallError("INTERNAL", "the server sent a compressed message")
            out.append(bytes(self._messages[5 : 5 + size]))
            del self._messages[: 5 + size]

    def status(self) -> CallError | None:
        """How the ended call ended: None for OK, else the error (status, details, trailers)."""
        if self._reset is not None and self.trailers is None:
            return self._reset
        headers = dict(self.headers or ())
        http = headers.get(":status", "")
        if http and http != "200":
            return CallError(
                _HTTP_STATUS.get(http, "UNKNOWN"), f"HTTP status {http} from the server"
            )
        if self.trailers is None:
            return CallError("INTERNAL", "the server ended the call without a status")
        trailing = [(k, v) for k, v in self.trailers if not k.startswith(":")]
        fields = dict(trailing)
        code = fields.get("grpc-status", "")
        if not code.isdigit():
            return CallError("UNKNOWN", "the server's answer carries no grpc-status", trailing)
        number = int(code)
        if number == 0:
            return None
        name = STATUS_NAMES.get(number, "UNKNOWN")
        return CallError(name, _percent_decoded(fields.get("grpc-message", "")), trailing)


def unary(call: Call, request: bytes) -> bytes:
    """Send `request`, wait for the one reply; CallError when the call fails."""
    import select

    call.send(request)
    call.close_send()
    replies: list[bytes] = []
    while not call.ended:
        if not call.buffered():
            select.select([call.sock.fileno()], [], [])
        replies += call.receive()
    failure = call.status()
    if failure is not None:
        raise failure
    if len(replies) != 1:
        raise CallError("INTERNAL", f"a unary call answered {len(replies)} messages")
    return replies[0]
