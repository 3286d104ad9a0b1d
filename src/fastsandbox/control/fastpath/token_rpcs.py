"""The Fast-Path's token RPCs (CreateToken, ListTokens, RevokeToken): admin only, by their rows
in `access.RULES`. The secret leaves the server once, in the CreateToken reply, and is never
logged; the store keeps its hash (`control.tokens`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import grpc
from pydantic import ValidationError

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2
from fastsandbox.api.models import ObjectMeta, now
from fastsandbox.control.tokens import TokenRecord, TokenStore, new_token
from fastsandbox.errors import FailedPrecondition, FsbError, InvalidArgument

log = logging.getLogger(__name__)

MAX_TTL_SECONDS = 100 * 365 * 24 * 3600


def _stamp(at: datetime | None) -> str:
    if at is None:
        return ""
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


def token_info(record: TokenRecord) -> fastpath_pb2.TokenInfo:
    return fastpath_pb2.TokenInfo(
        id=record.id,
        namespace=record.namespace,
        created=_stamp(record.created),
        expires=_stamp(record.expires),
    )


class TokenRpcs:
    """Mixed into `FastPathService`; the composition root sets `token_store` (and
    `token_revoked`, so a revoke empties the authenticator's cache at once)."""

    token_store: TokenStore | None = None
    token_revoked: Callable[[str], None] | None = None

    def _tokens(self) -> TokenStore:
        if self.token_store is None:
            raise FailedPrecondition("this server keeps no tenant tokens: use its admin token")
        return self.token_store

    async def CreateToken(
        self, request: fastpath_pb2.CreateTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.CreateTokenReply:
        try:
            store = self._tokens()
            if not request.namespace:
                raise InvalidArgument("namespace: required (the namespace the token may act in)")
            try:
                ObjectMeta(name="token", namespace=request.namespace)
            except ValidationError:
                raise InvalidArgument(
                    f"namespace: {request.namespace!r} is not a valid namespace name"
                ) from None
            if not 0 <= request.ttl_seconds <= MAX_TTL_SECONDS:
                raise InvalidArgument("ttl_seconds: must be between 0 (never) and 100 years")
            ttl = timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else None
            token, record = new_token(request.namespace, now(), ttl)
            await store.add(record)
        except FsbError as exc:
            await context.abort(exc.grpc_code, exc.message)
            raise AssertionError("unreachable") from exc
        log.info("token created", extra={"token_id": record.id, "namespace": record.namespace})
        return fastpath_pb2.CreateTokenReply(info=token_info(record), token=token)

    async def ListTokens(
        self, request: fastpath_pb2.ListTokensRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.ListTokensReply:
        try:
            records = await self._tokens().list()
        except FsbError as exc:
            await context.abort(exc.grpc_code, exc.message)
            raise AssertionError("unreachable") from exc
        return fastpath_pb2.ListTokensReply(tokens=[token_info(r) for r in records])

    async def RevokeToken(
        self, request: fastpath_pb2.RevokeTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> fastpath_pb2.RevokeTokenReply:
        try:
            if not request.id:
                raise InvalidArgument("id: required (see fsb token list)")
            await self._tokens().delete(request.id)
        except FsbError as exc:
            await context.abort(exc.grpc_code, exc.message)
            raise AssertionError("unreachable") from exc
        if self.token_revoked is not None:
            self.token_revoked(request.id)
        log.info("token revoked", extra={"token_id": request.id})
        return fastpath_pb2.RevokeTokenReply()
