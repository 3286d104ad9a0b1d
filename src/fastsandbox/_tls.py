"""Certificates for our own gRPC links: a small CA and the leaf certificates it signs.

The one place certificates are made: the Kubernetes fleet's agent CA (it signs every agent's
serving certificate) and the Fast-Path's CA (`control/fastpath/tls.py` decides where its
material comes from and is kept; the certificates are made here). Imports no server code, so
`control`, `agent` and `fleet` can all use it.
ECDSA P-256 keys, PEM everywhere, SHA-256 signatures. Also the per-agent bearer token:
HMAC-SHA256 of the agent's identity under a key only the controller holds, so each agent has a
token of its own and none can be derived from another.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Where agent certificates live in name space: never resolved, only compared (the controller
# dials the Pod's IP and checks that the certificate names the agent it meant to reach).
AGENT_NAME_SUFFIX = "agent.fastsandbox.internal"
# Clock skew between the signer and the verifier must not make a new certificate "not yet valid".
_BACKDATE = dt.timedelta(minutes=5)


def agent_server_name(namespace: str, name: str) -> str:
    """The DNS name an agent's certificate carries: `<pod>.<ns>.agent.fastsandbox.internal`."""
    return f"{name}.{namespace}.{AGENT_NAME_SUFFIX}"


def derive_token(key: bytes, subject: str) -> str:
    """A bearer token for `subject` (e.g. `namespace/agent`) that only the holder of `key` can
    compute: base64url(HMAC-SHA256(key, subject)), unpadded."""
    digest = hmac.new(key, subject.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def split_names(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of a mixed list of host names, as `issue` takes them."""
    dns: list[str] = []
    ips: list[str] = []
    for name in names:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.append(name)
    return dns, ips


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fastsandbox"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )


def new_ca(common_name: str, *, days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed CA: (certificate PEM, private key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int = 365,
    client: bool = False,
) -> tuple[bytes, bytes]:
    """A leaf certificate signed by the CA, for serving (or, `client`, for client auth):
    (certificate PEM, private key PEM)."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def ca_usable(ca_cert_pem: bytes, ca_key_pem: bytes, *, valid_for: dt.timedelta) -> bool:
    """The CA parses, is an EC key's own certificate, and stays valid `valid_for` from now (so
    a certificate it signs now does not outlive it)."""
    try:
        cert = x509.load_pem_x509_certificate(ca_cert_pem)
        key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except ValueError:
        return False
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return False
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    same = cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    return same and cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + valid_for
