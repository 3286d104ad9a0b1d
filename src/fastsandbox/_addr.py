"""HOST:PORT helpers shared by the CLI (checking flags early) and the Fast-Path (serving)."""

from __future__ import annotations

import ipaddress

from fastsandbox.errors import InvalidArgument


def listen_host(listen: str) -> str:
    host, sep, _port = listen.rpartition(":")
    if not sep:
        raise InvalidArgument(f"--listen: {listen!r} is not HOST:PORT")
    return host.strip("[]")


def is_loopback(listen: str) -> bool:
    """`listen` names a loopback address (127.0.0.0/8, ::1, localhost)."""
    host = listen_host(listen)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
