"""Serving the Fast-Path: one gRPC server with the token check, as both composition roots
(`fsb server`, `fsb controller`) run it."""

from __future__ import annotations

import grpc

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2_grpc
from fastsandbox.control.fastpath.auth import TokenAuth
from fastsandbox.control.fastpath.service import FastPathService
from fastsandbox.errors import FsbError


async def start_fastpath(servicer: FastPathService, token: str, listen: str) -> grpc.aio.Server:
    """A started server on `listen` (HOST:PORT) requiring `token`."""
    # No SO_REUSEPORT: a second server on the same address must fail, not share the port.
    server = grpc.aio.server(interceptors=[TokenAuth(token)], options=[("grpc.so_reuseport", 0)])
    fastpath_pb2_grpc.add_FastPathServicer_to_server(servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise FsbError(f"cannot listen on {listen}: address in use or invalid")
    await server.start()
    return server
