"""The Fast-Path's certificates, made by the one certificate module (`fastsandbox._tls`): the
server certificate names every address as the right kind of SAN, and a CA is reused only while
it is whole and outlives a certificate it would sign."""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509

from fastsandbox import _tls
from fastsandbox.control.fastpath.tls import CERT_DAYS, ca_usable, issue_server_cert, new_ca


def test_the_server_certificate_names_hosts_and_addresses_apart() -> None:
    ca_cert, ca_key = new_ca()
    pem, _ = issue_server_cert(ca_cert, ca_key, ["localhost", "127.0.0.1", "::1", "a.example"])
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "a.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["localhost"]
    assert cert.issuer == x509.load_pem_x509_certificate(ca_cert).subject
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=CERT_DAYS) <= life <= dt.timedelta(days=CERT_DAYS, hours=1)


def test_a_ca_is_usable_only_whole_and_long_lived_enough() -> None:
    ca_cert, ca_key = new_ca()
    assert ca_usable(ca_cert, ca_key)
    assert not ca_usable(ca_cert, new_ca()[1])  # not its own key
    assert not ca_usable(b"garbage", ca_key)
    assert not ca_usable(ca_cert, b"garbage")
    short_cert, short_key = _tls.new_ca("short", days=CERT_DAYS - 1)
    assert not ca_usable(short_cert, short_key)  # would die before what it signs


def test_split_names() -> None:
    assert _tls.split_names(["h", "10.0.0.1", "fe80::1", "h.example"]) == (
        ["h", "h.example"],
        ["10.0.0.1", "fe80::1"],
    )
