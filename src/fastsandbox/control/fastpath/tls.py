"""TLS for the Fast-Path: our own small CA, or the operator's certificate.

The token travels with every call, so the Fast-Path is TLS unless `--insecure` asks otherwise
(and that only on a loopback address, where nobody else's packets pass). Without
`--tls-cert/--tls-key`, `fsb server` keeps a CA in `<data-dir>/tls/` (ECDSA P-256: generated
in a millisecond, 10 years) and issues the server a fresh certificate from it at every start,
so its names follow `--listen`; the CLI and SDK on the same machine trust `tls/ca.crt` from
the data dir by themselves. `fsb controller` keeps the same three PEMs in a Secret of its
namespace instead, so every replica serves the same certificate (`controller.py`).

The certificates themselves are made by `fastsandbox._tls` (the agents' CA uses it too); this
module decides where the Fast-Path's come from. Every file here is written owner-only (0600)
from its first byte, in a 0700 directory.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fastsandbox import _tls
from fastsandbox._addr import listen_host
from fastsandbox.errors import InvalidArgument

CA_DAYS = 3650
CERT_DAYS = 825
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """A server's certificate chain and key (PEM), and the CA a client should trust (None for
    an operator's certificate: its clients know their own CA)."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def server_names(listen: str, extra: Iterable[str] = ()) -> list[str]:
    """The names a client may use for this server: loopback, this host's names, the listen
    address (when it is one address, not every one), and `extra`."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()]
    host = listen_host(listen)
    if host not in ("", "0.0.0.0", "::"):
        names.append(host)
    names.extend(extra)
    return list(dict.fromkeys(n for n in names if n))


def new_ca(common_name: str = "fastsandbox CA") -> tuple[bytes, bytes]:
    """A self-signed CA for the Fast-Path: (certificate PEM, key PEM)."""
    return _tls.new_ca(common_name, days=CA_DAYS)


def issue_server_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, names: Iterable[str]
) -> tuple[bytes, bytes]:
    """A server certificate for `names` (the first is its common name) signed by the CA:
    (certificate PEM, key PEM)."""
    names = list(names)
    dns, ips = _tls.split_names(names)
    try:
        return _tls.issue(
            ca_cert_pem, ca_key_pem, names[0], dns_names=dns, ip_addresses=ips, days=CERT_DAYS
        )
    except ValueError:
        raise InvalidArgument(
            "the CA key is not an ECDSA key: remove it to have a new CA made"
        ) from None


def ca_usable(ca_cert_pem: bytes, ca_key_pem: bytes) -> bool:
    """The CA parses, is still valid for a certificate's life, and the key is its own."""
    return _tls.ca_usable(ca_cert_pem, ca_key_pem, valid_for=timedelta(days=CERT_DAYS))


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, mode 0600 from the first byte (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def data_dir_tls(tls_dir: Path, names: Iterable[str]) -> TlsMaterial:
    """Our CA in `tls_dir` (made once, or again when unusable) and a new server certificate
    for `names` from it."""
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    ca_cert_path, ca_key_path = tls_dir / CA_CERT, tls_dir / CA_KEY
    try:
        ca_cert, ca_key = ca_cert_path.read_bytes(), ca_key_path.read_bytes()
    except FileNotFoundError:
        ca_cert = ca_key = b""
    if not ca_usable(ca_cert, ca_key):
        ca_cert, ca_key = new_ca()
        write_private(ca_key_path, ca_key)
        write_private(ca_cert_path, ca_cert)
    cert, key = issue_server_cert(ca_cert, ca_key, names)
    write_private(tls_dir / SERVER_KEY, key)
    write_private(tls_dir / SERVER_CERT, cert)
    return TlsMaterial(cert_pem=cert, key_pem=key, ca_pem=ca_cert)


def operator_tls(cert: Path, key: Path) -> TlsMaterial:
    """The operator's `--tls-cert/--tls-key`, checked to parse (a typo fails at start)."""
    try:
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"--tls-cert/--tls-key: cannot read {exc.filename}: {exc.strerror}"
        ) from None
    try:
        x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise InvalidArgument(f"--tls-cert: {cert} is not a PEM certificate") from None
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise InvalidArgument(f"--tls-key: {key} is not an unencrypted PEM private key") from None
    return TlsMaterial(cert_pem=cert_pem, key_pem=key_pem)
