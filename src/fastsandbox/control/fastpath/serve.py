"""Serving the Fast-Path: one gRPC server with the token check, as both composition roots
(`fsb server`, `fsb controller`) run it."""

from __future__ import annotations

from typing import Protocol

import grpc

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2_grpc
from fastsandbox.control.fastpath.access import AccessControl, Authenticator, Authorizer
from fastsandbox.control.fastpath.auth import TokenAuth
from fastsandbox.control.fastpath.service import FastPathService
from fastsandbox.control.fastpath.throttle import Throttle
from fastsandbox.errors import FsbError
from fastsandbox.settings import EdgeLimits


class Identities(Authenticator, Authorizer, Protocol):
    """Who else may call (besides the admin token), and what each may do."""


async def start_fastpath(
    servicer: FastPathService,
    token: str,
    listen: str,
    limits: EdgeLimits | None = None,
    identities: Identities | None = None,
) -> grpc.aio.Server:
    """A started server on `listen` (HOST:PORT) requiring `token`, each credential held to
    `limits` (rate, concurrent streams, message size). With `identities` (the controller's
    Kubernetes ones), other tokens those know are accepted too, every call authorized."""
    limits = limits or EdgeLimits()
    gate: grpc.aio.ServerInterceptor = (  # type: ignore[type-arg]
        TokenAuth(token) if identities is None else AccessControl(token, identities, identities)
    )
    server = grpc.aio.server(
        interceptors=[Throttle(limits), gate],
        options=[
            # No SO_REUSEPORT: a second server on the same address must fail, not share it.
            ("grpc.so_reuseport", 0),
            # gRPC refuses a bigger message itself: RESOURCE_EXHAUSTED naming both sizes.
            ("grpc.max_receive_message_length", limits.max_message_bytes),
        ],
    )
    fastpath_pb2_grpc.add_FastPathServicer_to_server(servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise FsbError(f"cannot listen on {listen}: address in use or invalid")
    await server.start()
    return server
