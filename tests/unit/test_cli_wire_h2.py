"""The lean client's HTTP/2 call against a scripted peer on a socketpair: the protocol duties a
real grpc server exercises only sometimes (SETTINGS and PING acks, CONTINUATION, flow control
that holds our data back until a WINDOW_UPDATE, RST_STREAM, GOAWAY, trailers-only errors)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from fastsandbox.cli.wire import h2, hpack


class Peer:
    """The server end: reads our frames, writes frames of its choosing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.sock.settimeout(5)
        assert self._read(len(h2.PREFACE)) == h2.PREFACE

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            assert chunk, "the client closed"
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def frame(self) -> tuple[int, int, int, bytes]:
        head = self._read(9)
        length = int.from_bytes(head[:3], "big")
        return head[3], head[4], int.from_bytes(head[5:9], "big"), self._read(length)

    def frames_until(self, kind: int) -> list[tuple[int, int, int, bytes]]:
        seen = []
        while True:
            seen.append(self.frame())
            if seen[-1][0] == kind:
                return seen

    def send(self, kind: int, flags: int, stream: int, payload: bytes = b"") -> None:
        self.sock.sendall(h2._frame(kind, flags, stream, payload))


def _message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


@pytest.fixture
def pair() -> Iterator[tuple[h2.Call, Peer]]:
    ours, theirs = socket.socketpair()
    try:
        call = h2.Call(
            ours, authority="a:1", path="/p/M", metadata=[("authorization", "x")], tls=False
        )
        yield call, Peer(theirs)
    finally:
        ours.close()
        theirs.close()


def _drive(call: h2.Call) -> list[bytes]:
    return call.receive()


def test_the_request_headers_and_setting_acks(pair: tuple[h2.Call, Peer]) -> None:
    call, peer = pair
    frames = peer.frames_until(h2.HEADERS)
    kinds = [f[0] for f in frames]
    assert kinds == [h2.SETTINGS, h2.WINDOW_UPDATE, h2.HEADERS]
    headers = dict(hpack.Decoder().decode(frames[-1][3]))
    assert headers[":path"] == "/p/M" and headers["content-type"] == "application/grpc"
    assert headers["te"] == "trailers" and headers["authorization"] == "x"
    peer.send(h2.SETTINGS, 0, 0, struct.pack(">HI", 0x5, 32768))
    peer.send(h2.PING, 0, 0, b"12345678")
    _drive(call)
    got = peer.frames_until(h2.PING)
    assert (h2.SETTINGS, h2.ACK) in [(f[0], f[1]) for f in got]
    assert got[-1][1] == h2.ACK and got[-1][3] == b"12345678"


def test_data_waits_for_the_peers_window(pair: tuple[h2.Call, Peer]) -> None:
    call, peer = pair
    peer.frames_until(h2.HEADERS)
    peer.send(h2.SETTINGS, 0, 0, struct.pack(">HI", 0x4, 10))  # a 10-byte stream window
    _drive(call)
    call.send(b"x" * 25)  # 30 bytes framed
    first = [f for f in peer.frames_until(h2.DATA) if f[0] == h2.DATA]
    assert len(first[0][3]) == 10 and call.pending() == 20
    peer.send(h2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 100))
    _drive(call)
    rest = peer.frames_until(h2.DATA)[-1]
    assert first[0][3] + rest[3] == _message(b"x" * 25) and call.pending() == 0


def test_messages_split_across_frames_and_headers_across_continuation(
    pair: tuple[h2.Call, Peer],
) -> None:
    call, peer = pair
    peer.frames_until(h2.HEADERS)
    block = hpack.encode([(":status", "200"), ("content-type", "application/grpc")])
    peer.send(h2.HEADERS, 0, 1, block[:5])
    peer.send(h2.CONTINUATION, h2.END_HEADERS, 1, block[5:])
    wire = _message(b"one") + _message(b"two")
    peer.send(h2.DATA, 0, 1, wire[:6])
    assert _drive(call) == []
    peer.send(h2.DATA, h2.PADDED, 1, bytes([3]) + wire[6:] + b"\0\0\0")
    assert _drive(call) == [b"one", b"two"]
    trailers = hpack.encode([("grpc-status", "0")])
    peer.send(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, trailers)
    _drive(call)
    assert call.ended and call.status() is None


def test_a_trailers_only_error_keeps_its_words_and_retry_after(pair: tuple[h2.Call, Peer]) -> None:
    call, peer = pair
    peer.frames_until(h2.HEADERS)
    block = hpack.encode(
        [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "8"),
         ("grpc-message", "too%20many %E2%9C%93"), ("retry-after", "2.5")]
    )  # fmt: skip
    peer.send(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, block)
    _drive(call)
    failure = call.status()
    assert failure is not None
    assert (failure.status, failure.details) == ("RESOURCE_EXHAUSTED", "too many ✓")
    assert ("retry-after", "2.5") in failure.trailing


def test_a_refused_stream_is_unavailable(pair: tuple[h2.Call, Peer]) -> None:
    call, peer = pair
    peer.frames_until(h2.HEADERS)
    peer.send(h2.RST_STREAM, 0, 1, struct.pack(">I", 7))  # REFUSED_STREAM
    _drive(call)
    failure = call.status()
    assert call.ended and failure is not None and failure.status == "UNAVAILABLE"


def test_goaway_that_did_not_take_the_call(pair: tuple[h2.Call, Peer]) -> None:
    call, peer = pair
    peer.frames_until(h2.HEADERS)
    peer.send(h2.GOAWAY, 0, 0, struct.pack(">II", 0, 0))
    with pytest.raises(h2.CallError) as caught:
        _drive(call)
    assert caught.value.status == "UNAVAILABLE"


def test_a_closed_connection_is_unavailable(pair: tuple[h2.Call, Peer]) -> None:
    call, peer = pair
    peer.frames_until(h2.HEADERS)
    peer.sock.close()
    with pytest.raises(h2.CallError) as caught:
        _drive(call)
    assert caught.value.status == "UNAVAILABLE"


def test_a_non_grpc_answer_maps_its_http_status(pair: tuple[h2.Call, Peer]) -> None:
    call, peer = pair
    peer.frames_until(h2.HEADERS)
    peer.send(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, hpack.encode([(":status", "503")]))
    _drive(call)
    failure = call.status()
    assert failure is not None and failure.status == "UNAVAILABLE"


def test_unary_half_closes_and_returns_the_reply(pair: tuple[h2.Call, Peer]) -> None:
    import threading

    call, peer = pair

    def serve() -> None:
        frames = peer.frames_until(h2.HEADERS)
        while not (frames[-1][0] == h2.DATA and frames[-1][1] & h2.END_STREAM):
            frames.append(peer.frame())
        data = b"".join(f[3] for f in frames if f[0] == h2.DATA)
        assert data == _message(b"req")
        peer.send(h2.HEADERS, h2.END_HEADERS, 1, hpack.encode([(":status", "200")]))
        peer.send(h2.DATA, 0, 1, _message(b"reply"))
        peer.send(
            h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, hpack.encode([("grpc-status", "0")])
        )

    server = threading.Thread(target=serve)
    server.start()
    try:
        assert h2.unary(call, b"req") == b"reply"
    finally:
        server.join(10)
