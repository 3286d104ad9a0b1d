"""HPACK (RFC 7541), as much as one gRPC client needs: encode our few request headers, decode
everything a server (or a proxy in front of it) may send.

Encoding uses "literal without indexing" with plain strings: it is always valid, and the few
bytes Huffman or indexing would save do not matter for one request. Decoding is complete:
static and dynamic table, table size updates, integers, Huffman-coded strings.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable


class HpackError(Exception):
    """The peer's header block cannot be decoded: a connection error (COMPRESSION_ERROR)."""


# RFC 7541 Appendix A.
_STATIC: tuple[tuple[str, str], ...] = (
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"),
    (":path", "/index.html"), (":scheme", "http"), (":scheme", "https"), (":status", "200"),
    (":status", "204"), (":status", "206"), (":status", "304"), (":status", "400"),
    (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""),
    ("accept", ""), ("access-control-allow-origin", ""), ("age", ""), ("allow", ""),
    ("authorization", ""), ("cache-control", ""), ("content-disposition", ""),
    ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
    ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""),
    ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""),
    ("max-forwards", ""), ("proxy-authenticate", ""), ("proxy-authorization", ""),
    ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""), ("server", ""),
    ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
    ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
)  # fmt: skip

# RFC 7541 Appendix B, as the code length of each symbol 0..256 (EOS) written as a letter
# (A = 5 bits ... Z = 30 bits). The code is canonical: codes of one length are consecutive in
# symbol order, each length's first code following the previous length's last, so the lengths
# alone define it (tests/unit/test_cli_wire.py checks the RFC's examples and that it is complete).
_LENGTHS = (
    "ISXXXXXXXTZXXZXXXXXXXXZXXXXXXXXXBFFHIBDGFFDGDBBBAAABBBBBBBCDKBHFIBCCCCCCCCCCCCCCCCCCCCCCDCDI"
    "OIJBKABABABBBACCBBBABCBAABCCCCCKGJIXPRPPRRRSRSSSSSTSTTRSTSSSSQRSRSSTRQPRRSSQSRRTQRSSQQRQSRSSP"
    "RRRSRRSVVPORSRUVVVWWVTUOQVWWVWTQQVVXWWWPTPQRQQSRRUUTTVSVWVVWWWWWXWWWWWVZ"
)
_EOS = 256
_DECODE: dict[tuple[int, int], int] = {}  # (length, code) -> symbol, built on first use


def _huffman_table() -> dict[tuple[int, int], int]:
    if not _DECODE:
        lengths = [ord(c) - ord("A") + 5 for c in _LENGTHS]
        code, prev = -1, min(lengths)
        for sym in sorted(range(len(lengths)), key=lambda s: (lengths[s], s)):
            code = (code + 1) << (lengths[sym] - prev)
            prev = lengths[sym]
            _DECODE[(prev, code)] = sym
    return _DECODE


def huffman_decode(data: bytes) -> bytes:
    table = _huffman_table()
    out = bytearray()
    code = length = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            length += 1
            sym = table.get((length, code))
            if sym is not None:
                if sym == _EOS:
                    raise HpackError("Huffman string contains EOS")
                out.append(sym)
                code = length = 0
            elif length > 30:
                raise HpackError("invalid Huffman code")
    # Padding: fewer than 8 bits, all ones (a prefix of EOS).
    if length > 7 or code != (1 << length) - 1:
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def encode_int(value: int, prefix: int, flags: int = 0) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([flags | value])
    out = bytearray([flags | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return encode_int(len(raw), 7) + raw


def encode(headers: Iterable[tuple[str, str]]) -> bytes:
    """A header block of literals without indexing (new names; no Huffman)."""
    block = bytearray()
    for name, value in headers:
        block += b"\x00" + _string(name) + _string(value)
    return bytes(block)


class Decoder:
    """One connection's decoding context (its dynamic table lives as long as the connection)."""

    def __init__(self, max_size: int = 4096) -> None:
        self._dynamic: list[tuple[str, str]] = []  # newest first
        self._size = 0
        self._max = max_size
        self._limit = max_size  # what our SETTINGS allow the peer to use

    def _entry(self, index: int) -> tuple[str, str]:
        if 0 < index <= len(_STATIC):
            return _STATIC[index - 1]
        dyn = index - len(_STATIC) - 1
        if index == 0 or dyn >= len(self._dynamic):
            raise HpackError(f"header index {index} out of range")
        return self._dynamic[dyn]

    def _add(self, name: str, value: str) -> None:
        self._dynamic.insert(0, (name, value))
        self._size += len(name.encode()) + len(value.encode()) + 32
        self._evict()

    def _evict(self) -> None:
        while self._size > self._max and self._dynamic:
            name, value = self._dynamic.pop()
            self._size -= len(name.encode()) + len(value.encode()) + 32

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        pos = 0
        while pos < len(block):
            first = block[pos]
            if first & 0x80:  # indexed
                index, pos = self._int(block, pos, 7)
                headers.append(self._entry(index))
            elif first & 0x40:  # literal, incremental indexing
                name, value, pos = self._literal(block, pos, 6)
                self._add(name, value)
                headers.append((name, value))
            elif first & 0x20:  # dynamic table size update
                size, pos = self._int(block, pos, 5)
                if size > self._limit:
                    raise HpackError(f"table size {size} above the {self._limit} allowed")
                self._max = size
                self._evict()
            else:  # literal without indexing / never indexed
                name, value, pos = self._literal(block, pos, 4)
                headers.append((name, value))
        return headers

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[str, str, int]:
        index, pos = self._int(block, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = self._str(block, pos)
        value, pos = self._str(block, pos)
        return name, value, pos

    @staticmethod
    def _int(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
        limit = (1 << prefix) - 1
        value = block[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            if pos >= len(block) or shift > 28:
                raise HpackError("truncated or oversized integer")
            byte = block[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    def _str(self, block: bytes, pos: int) -> tuple[str, int]:
        if pos >= len(block):
            raise HpackError("truncated string")
        huffman = bool(block[pos] & 0x80)
        length, pos = self._int(block, pos, 7)
        if pos + length > len(block):
            raise HpackError("truncated string")
        raw = block[pos : pos + length]
        text = huffman_decode(raw) if huffman else raw
        return text.decode("utf-8", "replace"), pos + length
