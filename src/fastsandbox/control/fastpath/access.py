"""Every Fast-Path call authenticated and authorized before the servicer sees it.

`RULES` has one row per RPC of `fastpath.proto`'s FastPath service: the `Action` (RBAC verb,
resource, subresource, namespace) its request asks for. `AccessGuard` (a server interceptor)
authenticates the call's metadata, then wraps the RPC's handler so the request — for a
client-streaming RPC its first message, which names the sandbox — is authorized before the
servicer runs. A method without a row is refused (PERMISSION_DENIED) and `check_rules` fails the
server's start, so a new RPC cannot be served unguarded; tests/e2e/test_tenants.py drives its
matrix from the same descriptor.

The caller travels to the servicer in a context variable (`current_caller`): `List` uses it to
blank the env values of sandboxes the caller may list but not read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc

from fastsandbox._grpc_auth import HEALTH_CHECK, Handler, deny, drain
from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2
from fastsandbox.control.fastpath.authz import Action, Authenticator, Authorizer, Principal
from fastsandbox.errors import FsbError, InvalidArgument

log = logging.getLogger(__name__)

SERVICE = fastpath_pb2.DESCRIPTOR.services_by_name["FastPath"]
PREFIX = f"/{SERVICE.full_name}/"
DEFAULT_NAMESPACE = "default"

Rule = Callable[[Any], Action]


def _ns(namespace: str) -> str:
    # The servicer's own default for an empty namespace: both must read the request alike.
    return namespace or DEFAULT_NAMESPACE


def _sandbox(verb: str, subresource: str = "") -> Rule:
    return lambda r: Action(verb, "sandboxes", _ns(r.namespace), subresource)


def _pool(verb: str) -> Rule:
    return lambda r: Action(verb, "sandboxpools", _ns(r.namespace))


def _listing(resource: str) -> Rule:
    # An empty namespace lists every namespace (`fsb list -A`).
    return lambda r: Action("list", resource, r.namespace or None)


def _target(verb: str, subresource: str, target: Callable[[Any], Any]) -> Rule:
    return lambda r: Action(verb, "sandboxes", _ns(target(r).namespace), subresource)


def _pool_json(verb: str) -> Rule:
    def rule(request: fastpath_pb2.PoolRequest) -> Action:
        try:
            body = json.loads(request.object_json)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"pool is not valid JSON: {exc}") from None
        meta = body.get("metadata") if isinstance(body, dict) else None
        namespace = meta.get("namespace") if isinstance(meta, dict) else None
        if namespace is not None and not isinstance(namespace, str):
            raise InvalidArgument("metadata.namespace: must be a string")
        return Action(verb, "sandboxpools", _ns(namespace or ""))

    return rule


def _events(request: fastpath_pb2.EventsRequest) -> Action:
    resource = "sandboxpools" if request.kind == "SandboxPool" else "sandboxes"
    return Action("get", resource, _ns(request.namespace), "events")


def _tokens(verb: str) -> Rule:
    return lambda _r: Action(verb, "tokens", None)


RULES: Mapping[str, Rule] = {
    "Create": _sandbox("create"),
    "Get": _sandbox("get"),
    "List": _listing("sandboxes"),
    "Delete": _sandbox("delete"),
    "Logs": _sandbox("get", "logs"),
    "Update": _sandbox("update"),
    "Reset": _sandbox("update", "reset"),
    "ListEvents": _events,
    "RenewLease": _sandbox("update", "lease"),
    "CreatePool": _pool_json("create"),
    "GetPool": _pool("get"),
    "ListPools": _listing("sandboxpools"),
    "DeletePool": _pool("delete"),
    "UpdatePool": _pool_json("update"),
    # Client-streaming: the rule reads the first message (start / header).
    "Exec": _target("create", "exec", lambda m: m.start.target),
    "ListProcesses": _target("get", "exec", lambda m: m.target),
    "FileOp": _target("update", "files", lambda m: m.target),
    "ReadFile": _target("get", "files", lambda m: m.target),
    "WriteFile": _target("update", "files", lambda m: m.header.target),
    "Watch": _target("get", "files", lambda m: m.target),
    "CreateToken": _tokens("create"),
    "ListTokens": _tokens("list"),
    "RevokeToken": _tokens("delete"),
}


def check_rules(rules: Mapping[str, Rule] = RULES) -> None:
    """Every RPC of the service has a rule (and no rule names an RPC that does not exist)."""
    methods = {m.name for m in SERVICE.methods}
    missing, extra = methods - set(rules), set(rules) - methods
    if missing or extra:
        raise RuntimeError(
            f"Fast-Path access rules out of step with fastpath.proto: no rule for "
            f"{sorted(missing)}, rules for unknown {sorted(extra)}"
        )


@dataclass(frozen=True, slots=True)
class Caller:
    principal: Principal
    authorizer: Authorizer
    _seen: dict[Action, bool] = field(default_factory=dict)

    async def may(self, action: Action) -> bool:
        if action not in self._seen:
            try:
                await self.authorizer.authorize(self.principal, action)
                self._seen[action] = True
            except FsbError:
                self._seen[action] = False
        return self._seen[action]


_CALLER: ContextVar[Caller | None] = ContextVar("fastpath_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the RPC being served (None outside `AccessGuard`, e.g. unit tests)."""
    return _CALLER.get()


async def _peek(requests: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[Any]]:
    it = requests.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[Any]:
        if first is not None:
            yield first
        async for message in it:
            yield message

    return first, rest()


def _wrap(handler: Handler, caller: Caller, rule: Rule) -> Handler:
    """`handler` with the authorization of its request (or first message) in front."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    async def refusal(request: Any) -> FsbError | None:
        _CALLER.set(caller)
        if request is None:
            return None  # an empty stream: the servicer refuses it, touching nothing
        try:
            await caller.authorizer.authorize(caller.principal, rule(request))
        except FsbError as exc:
            return exc
        return None

    async def check(request: Any, context: Any, rest: AsyncIterator[Any] | None = None) -> None:
        refused = await refusal(request)
        if refused is not None:
            if rest is not None:
                await drain(rest)  # see _grpc_auth.drain: the refusal must reach the client
            await context.abort(refused.grpc_code, refused.message)

    if handler.request_streaming and handler.response_streaming:
        stream_stream: Any = handler.stream_stream

        async def ss(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            first, rest = await _peek(requests)
            await check(first, context, rest)
            async for out in stream_stream(rest, context):
                yield out

        return grpc.stream_stream_rpc_method_handler(ss, **kwargs)
    if handler.request_streaming:
        stream_unary: Any = handler.stream_unary

        async def su(requests: AsyncIterator[Any], context: Any) -> Any:
            first, rest = await _peek(requests)
            await check(first, context, rest)
            return await stream_unary(rest, context)

        return grpc.stream_unary_rpc_method_handler(su, **kwargs)
    if handler.response_streaming:
        unary_stream: Any = handler.unary_stream

        async def us(request: Any, context: Any) -> AsyncIterator[Any]:
            await check(request, context)
            async for out in unary_stream(request, context):
                yield out

        return grpc.unary_stream_rpc_method_handler(us, **kwargs)
    unary_unary: Any = handler.unary_unary

    async def uu(request: Any, context: Any) -> Any:
        await check(request, context)
        return await unary_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(uu, **kwargs)


class AccessGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticate every call, authorize its request by `rules`; health checks exempt."""

    def __init__(
        self,
        authenticator: Authenticator,
        authorizer: Authorizer,
        rules: Mapping[str, Rule] = RULES,
    ) -> None:
        check_rules(rules)
        self._authenticator = authenticator
        self._authorizer = authorizer
        self._rules = rules

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or details.method == HEALTH_CHECK:
            return handler
        name = details.method.removeprefix(PREFIX) if details.method.startswith(PREFIX) else ""
        rule = self._rules.get(name)
        if rule is None:
            return deny(
                handler, f"{details.method}: no access rule", grpc.StatusCode.PERMISSION_DENIED
            )
        metadata: dict[str, str] = {}
        for key, value in details.invocation_metadata or ():
            metadata[key] = value if isinstance(value, str) else value.decode(errors="replace")
        try:
            principal = await self._authenticator.authenticate(metadata)
        except FsbError as exc:
            return deny(handler, exc.message, exc.grpc_code)
        return _wrap(handler, Caller(principal, self._authorizer), rule)
