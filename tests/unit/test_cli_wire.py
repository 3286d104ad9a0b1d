"""The lean client's pieces against their specs: HPACK against RFC 7541's own examples, the
hand-written Exec messages against the generated protobuf classes (both ways), grpc target
strings. End to end against a real grpc server: tests/unit/test_cli_exec_lean.py."""

from __future__ import annotations

import itertools
import socket

import pytest

from fastsandbox.api._proto.fastsandbox.v1 import io_pb2
from fastsandbox.cli.wire import h2, hpack, pb


@pytest.mark.parametrize(
    ("encoded", "text"),
    [  # RFC 7541 C.4 and C.6
        ("f1e3c2e5f23a6ba0ab90f4ff", b"www.example.com"),
        ("a8eb10649cbf", b"no-cache"),
        ("25a849e95ba97d7f", b"custom-key"),
        ("25a849e95bb8e8b4bf", b"custom-value"),
        ("d07abe941054d444a8200595040b8166e082a62d1bff", b"Mon, 21 Oct 2013 20:13:21 GMT"),
        ("9d29ad171863c78f0b97c8e9ae82ae43d3", b"https://www.example.com"),
    ],
)
def test_huffman_decodes_the_rfc_examples(encoded: str, text: bytes) -> None:
    assert hpack.huffman_decode(bytes.fromhex(encoded)) == text


def test_the_huffman_code_is_complete_and_prefix_free() -> None:
    table = hpack._huffman_table()
    assert len(table) == 257
    assert sum(2.0**-length for length, _ in table) == 1.0  # Kraft: complete
    codes = sorted((format(code, f"0{length}b") for length, code in table))
    assert not any(b.startswith(a) for a, b in itertools.pairwise(codes))


def test_bad_huffman_padding_is_refused() -> None:
    with pytest.raises(hpack.HpackError):
        hpack.huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4fe"))  # padding not all ones


def test_header_blocks_decode_with_the_dynamic_table() -> None:
    """RFC 7541 C.3 (literals) and C.4.1 (Huffman): the second block refers to an entry the
    first added to the dynamic table."""
    decoder = hpack.Decoder()
    first = decoder.decode(bytes.fromhex("828684410f7777772e6578616d706c652e636f6d"))
    assert first == [
        (":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")
    ]  # fmt: skip
    second = decoder.decode(bytes.fromhex("828684be58086e6f2d6361636865"))
    assert second[3:] == [(":authority", "www.example.com"), ("cache-control", "no-cache")]
    huff = hpack.Decoder().decode(bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"))
    assert huff == first


def test_integers_and_our_literals_round_trip() -> None:
    assert hpack.encode_int(10, 5) == b"\x0a"  # RFC 7541 C.1.1
    assert hpack.encode_int(1337, 5) == b"\x1f\x9a\x0a"  # C.1.2
    headers = [("authorization", "Bearer " + "x" * 300), ("te", "trailers"), ("é", "ü")]
    assert hpack.Decoder().decode(hpack.encode(headers)) == headers


def test_exec_start_parses_as_the_generated_class_reads_it() -> None:
    wire = pb.exec_start(
        "ns", "box", ["sh", "-c", "éché"], env=[("A", "1"), ("B", "")], cwd="/w", user="1000",
        pty=(120, 40), stdin=True, timeout=2.5, tag="fsb exec",
    )  # fmt: skip
    got = io_pb2.ExecInput.FromString(wire)
    want = io_pb2.ExecInput(
        start=io_pb2.ExecStart(
            target=io_pb2.SandboxTarget(namespace="ns", name="box"),
            argv=["sh", "-c", "éché"],
            env=[io_pb2.KeyValuePair(key="A", value="1"), io_pb2.KeyValuePair(key="B")],
            cwd="/w", user="1000", pty=io_pb2.TermSize(cols=120, rows=40), stdin=True,
            timeout_seconds=2.5, tag="fsb exec",
        )
    )  # fmt: skip
    assert got == want
    bare = io_pb2.ExecInput.FromString(pb.exec_start("default", "b", ["true"]))
    assert not bare.start.HasField("pty") and not bare.start.stdin


def test_the_other_inputs_parse_as_the_generated_class_reads_them() -> None:
    assert io_pb2.ExecInput.FromString(pb.stdin_data(b"\x00hi")) == io_pb2.ExecInput(
        stdin=b"\x00hi"
    )
    assert io_pb2.ExecInput.FromString(pb.close_stdin()) == io_pb2.ExecInput(close_stdin=True)
    assert io_pb2.ExecInput.FromString(pb.signal(15)) == io_pb2.ExecInput(signal=15)
    assert io_pb2.ExecInput.FromString(pb.resize(80, 24)) == io_pb2.ExecInput(
        resize=io_pb2.TermSize(cols=80, rows=24)
    )


@pytest.mark.parametrize(
    ("message", "want"),
    [
        (
            io_pb2.ExecOutput(started=io_pb2.ExecStarted(pid=4242)),
            ("started", b"", 4242, 0, 0, False),
        ),
        (io_pb2.ExecOutput(started=io_pb2.ExecStarted()), ("started", b"", 0, 0, 0, False)),
        (io_pb2.ExecOutput(stdout=b"out\x00"), ("stdout", b"out\x00", 0, 0, 0, False)),
        (io_pb2.ExecOutput(stderr=b""), ("stderr", b"", 0, 0, 0, False)),
        (
            io_pb2.ExecOutput(exited=io_pb2.ExecExited(exit_code=137, signal=9, timed_out=True)),
            ("exited", b"", 0, 137, 9, True),
        ),
        (
            io_pb2.ExecOutput(exited=io_pb2.ExecExited(exit_code=-1)),
            ("exited", b"", 0, -1, 0, False),
        ),
    ],
)
def test_outputs_read_as_the_generated_class_wrote_them(
    message: io_pb2.ExecOutput, want: tuple[object, ...]
) -> None:
    out = pb.exec_output(message.SerializeToString())
    assert (out.kind, out.data, out.pid, out.exit_code, out.signal, out.timed_out) == want


def test_unknown_fields_are_skipped() -> None:
    newer = (
        b"\x98\x06\x01" + b"\xa2\x06\x03abc" + io_pb2.ExecOutput(stdout=b"x").SerializeToString()
    )
    out = pb.exec_output(newer)  # fields 99 (varint) and 100 (bytes) come first
    assert (out.kind, out.data) == ("stdout", b"x")
    with pytest.raises(pb.WireError):
        pb.exec_output(b"\x12\x05ab")  # a length past the end


@pytest.mark.parametrize(
    ("endpoint", "want"),
    [
        ("127.0.0.1:9090", (socket.AF_INET, ("127.0.0.1", 9090), "127.0.0.1:9090")),
        ("localhost:1", (socket.AF_INET, ("localhost", 1), "localhost:1")),
        ("dns:///example.com:443", (socket.AF_INET, ("example.com", 443), "example.com:443")),
        ("ipv4:10.0.0.1:5", (socket.AF_INET, ("10.0.0.1", 5), "10.0.0.1:5")),
        ("[::1]:7", (socket.AF_INET, ("::1", 7), "[::1]:7")),
        ("ipv6:[::1]:7", (socket.AF_INET, ("::1", 7), "[::1]:7")),
        ("example.com", (socket.AF_INET, ("example.com", 443), "example.com")),
        ("unix:/run/fsb.sock", (socket.AF_UNIX, "/run/fsb.sock", "localhost")),
        ("unix:///run/fsb.sock", (socket.AF_UNIX, "/run/fsb.sock", "localhost")),
        ("unix:rel.sock", (socket.AF_UNIX, "rel.sock", "localhost")),
        # Only grpc knows these: the CLI leaves them to the SDK.
        ("dns://8.8.8.8/example.com:443", None),
        ("unix-abstract:fsb", None),
        ("xds:///svc", None),
        ("ipv4:10.0.0.1:5,10.0.0.2:5", None),
        ("host:notaport", None),
    ],
)
def test_grpc_targets(endpoint: str, want: object) -> None:
    assert h2.target(endpoint) == want


def test_grpc_message_is_percent_decoded() -> None:
    assert h2._percent_decoded("sandbox%20d%C3%A9j%C3%A0 100%") == "sandbox déjà 100%"


def test_status_numbers_are_grpcs() -> None:
    """errors.py spells gRPC's status numbers so the lean client needs no grpc import."""
    import grpc

    from fastsandbox.errors import STATUS_NUMBERS

    assert {code.name: code.value[0] for code in grpc.StatusCode} == STATUS_NUMBERS


def test_the_default_data_dir_is_settings_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_resolve.data_dir` spells settings' default without importing settings."""
    from fastsandbox.sdk._resolve import data_dir
    from fastsandbox.settings import default_data_dir

    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert data_dir({}) == str(default_data_dir())
    monkeypatch.setenv("XDG_DATA_HOME", "/x")
    assert data_dir({"XDG_DATA_HOME": "/x"}) == str(default_data_dir()) == "/x/fastsandbox"
