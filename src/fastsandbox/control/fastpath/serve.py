"""Serving the Fast-Path: one gRPC server behind the access guard, TLS unless told otherwise, as
both composition roots (`fsb server`, `fsb controller`) run it."""

from __future__ import annotations

import grpc

from fastsandbox._addr import is_loopback
from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2_grpc
from fastsandbox.control.fastpath.access import AccessGuard
from fastsandbox.control.fastpath.service import FastPathService
from fastsandbox.control.fastpath.throttle import Throttle
from fastsandbox.control.fastpath.tls import TlsMaterial
from fastsandbox.errors import FsbError, InvalidArgument
from fastsandbox.settings import EdgeLimits


def check_plaintext(listen: str) -> None:
    """Plaintext only on loopback: anywhere else the token would cross a network in clear."""
    if not is_loopback(listen):
        raise InvalidArgument(
            f"--insecure: plaintext is allowed only on a loopback address, not {listen}; "
            "drop --insecure (TLS) or listen on 127.0.0.1"
        )


async def start_fastpath(
    servicer: FastPathService,
    guard: AccessGuard,
    listen: str,
    tls: TlsMaterial | None,
    limits: EdgeLimits | None = None,
) -> grpc.aio.Server:
    """A started server on `listen` (HOST:PORT) behind `guard`, each credential held to
    `limits` (rate, concurrent streams, message size); `tls=None` is plaintext (loopback only)."""
    if tls is None:
        check_plaintext(listen)
    limits = limits or EdgeLimits()
    server = grpc.aio.server(
        interceptors=[Throttle(limits), guard],
        options=[
            # No SO_REUSEPORT: a second server on the same address must fail, not share it.
            ("grpc.so_reuseport", 0),
            # gRPC refuses a bigger message itself: RESOURCE_EXHAUSTED naming both sizes.
            ("grpc.max_receive_message_length", limits.max_message_bytes),
        ],
    )
    fastpath_pb2_grpc.add_FastPathServicer_to_server(servicer, server)
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, tls.credentials())
    if port == 0:
        raise FsbError(f"cannot listen on {listen}: address in use or invalid")
    await server.start()
    return server
