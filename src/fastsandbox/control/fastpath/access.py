"""Who may call which Fast-Path RPC on which namespace: an admin token, or identities an
`Authenticator` knows (on Kubernetes: ServiceAccount tokens, checked by TokenReview) with every
call checked by an `Authorizer` (SubjectAccessReview), as Kubernetes itself would check the same
verb on the same object.

Each RPC is one verb on one resource in one namespace (`RPC_ACCESS`), the way `kubectl` would
spell it: `Create` is `create sandboxes`, `GetPool` is `get sandboxpools`, `List` with no
namespace is `list sandboxes` cluster-wide. Working inside a sandbox (exec, file writes, reset,
lease renewal) changes it, so it is `update sandboxes`; reading from one (logs, files, processes,
events) is `get`. So `kubectl auth can-i create sandboxes -n team-a --as=...` answers for the
Fast-Path exactly as for `kubectl apply`. An RPC missing from the table is refused (fail closed).

The namespace is in the request, which an interceptor does not see: the check wraps the handler
and runs on the (first) request message, before the servicer does anything.

This is the Kubernetes side's own minimal seam; the embedded server's namespace-scoped tokens
can implement the same two Protocols.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from fastsandbox._grpc_auth import HEALTH_CHECK, Handler
from fastsandbox.errors import FsbError

API_GROUP = "fastsandbox.io"
SANDBOXES, POOLS = "sandboxes", "sandboxpools"
_SERVICE = "/fastsandbox.v1.FastPath/"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller."""

    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()
    admin: bool = False


@dataclass(frozen=True, slots=True)
class Access:
    verb: str
    resource: str
    namespace: str
    """"" for every namespace (a `List` without one)."""

    def describe(self) -> str:
        where = f"in namespace {self.namespace}" if self.namespace else "in every namespace"
        return f"{self.verb} {self.resource}.{API_GROUP} {where}"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str = ""


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Caller | None:
        """The caller this bearer token proves, or None (not a valid token). Raises
        `FsbError` (e.g. Unavailable) when it cannot tell."""
        ...


class Authorizer(Protocol):
    async def authorize(self, caller: Caller, access: Access) -> Decision: ...


def _ns(value: str) -> str:
    return value or "default"


def _pool_namespace(request: Any) -> str:
    try:
        meta = json.loads(request.object_json or "{}").get("metadata") or {}
        return _ns(str(meta.get("namespace") or ""))
    except (ValueError, AttributeError):
        return "default"  # the servicer refuses the bad JSON itself, naming the field


def _target(request: Any) -> str:
    return _ns(request.target.namespace)


def _exec_target(request: Any) -> str:
    return _ns(request.start.target.namespace)


def _write_target(request: Any) -> str:
    return _ns(request.header.target.namespace)


def _events(request: Any) -> tuple[str, str]:
    return (POOLS if request.kind == "SandboxPool" else SANDBOXES), _ns(request.namespace)


Rule = tuple[str, str, Callable[[Any], str]]

RPC_ACCESS: dict[str, Rule] = {
    "Create": ("create", SANDBOXES, lambda r: _ns(r.namespace)),
    "Get": ("get", SANDBOXES, lambda r: _ns(r.namespace)),
    "List": ("list", SANDBOXES, lambda r: r.namespace),
    "Delete": ("delete", SANDBOXES, lambda r: _ns(r.namespace)),
    "Logs": ("get", SANDBOXES, lambda r: _ns(r.namespace)),
    "Update": ("update", SANDBOXES, lambda r: _ns(r.namespace)),
    "Reset": ("update", SANDBOXES, lambda r: _ns(r.namespace)),
    "RenewLease": ("update", SANDBOXES, lambda r: _ns(r.namespace)),
    "ListEvents": ("get", SANDBOXES, lambda r: _ns(r.namespace)),  # resource: `_events`
    "CreatePool": ("create", POOLS, _pool_namespace),
    "GetPool": ("get", POOLS, lambda r: _ns(r.namespace)),
    "ListPools": ("list", POOLS, lambda r: r.namespace),
    "DeletePool": ("delete", POOLS, lambda r: _ns(r.namespace)),
    "UpdatePool": ("update", POOLS, _pool_namespace),
    "Exec": ("update", SANDBOXES, _exec_target),
    "ListProcesses": ("get", SANDBOXES, _target),
    "FileOp": ("update", SANDBOXES, _target),
    "ReadFile": ("get", SANDBOXES, _target),
    "WriteFile": ("update", SANDBOXES, _write_target),
    "Watch": ("get", SANDBOXES, _target),
}


def access_of(method: str, request: Any) -> Access | None:
    """What calling `method` (the RPC's name) with `request` asks for; None: unknown RPC."""
    rule = RPC_ACCESS.get(method)
    if rule is None:
        return None
    verb, resource, namespace = rule
    if method == "ListEvents":
        resource, ns = _events(request)
        return Access(verb, resource, ns)
    return Access(verb, resource, namespace(request))


def _bearer(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == "authorization":
            text = value if isinstance(value, str) else value.decode()
            return text.removeprefix("Bearer ").strip() if text.startswith("Bearer ") else ""
    return ""


def _refusing(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    async def deny(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    return _wrap(handler, lambda _request, context: deny(context))


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A streaming handler's responses: it yields them, or writes them itself and returns."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result


def _wrap(
    handler: Handler,
    check: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]],
) -> Handler:
    """A handler of the same shape that first awaits `check(first_request, context)`."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming:

        async def first_and_rest(requests: AsyncIterator[Any], context: Any) -> Any:
            first = await anext(requests, None)
            await check(first, context)

            async def chained() -> AsyncIterator[Any]:
                if first is not None:
                    yield first
                async for item in requests:
                    yield item

            return chained()

        if handler.response_streaming:
            inner_ss: Any = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: Any) -> Any:
                rest = await first_and_rest(requests, context)
                async for item in _responses(inner_ss(rest, context)):
                    yield item

            return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)
        inner_su: Any = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Any) -> Any:
            rest = await first_and_rest(requests, context)
            return await inner_su(rest, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    if handler.response_streaming:
        inner_us: Any = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> Any:
            await check(request, context)
            async for item in _responses(inner_us(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    inner_uu: Any = handler.unary_unary

    async def unary_unary(request: Any, context: Any) -> Any:
        await check(request, context)
        return await inner_uu(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)


@dataclass
class AccessControl(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The Fast-Path's gate: `admin_token` may do anything; any other bearer token must be
    known to `authenticator`, and each call allowed by `authorizer` (see the module docstring).
    Missing or unknown token: UNAUTHENTICATED; known but not allowed: PERMISSION_DENIED."""

    admin_token: str
    authenticator: Authenticator
    authorizer: Authorizer
    exempt: frozenset[str] = field(default_factory=lambda: frozenset({HEALTH_CHECK}))

    def __post_init__(self) -> None:
        if not self.admin_token:
            raise ValueError("an empty admin token would let anyone in")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or details.method in self.exempt:
            return handler
        token = _bearer(details)
        if not token:
            return _refusing(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing API token: pass --token or set FSB_TOKEN (the controller's token, or a "
                "Kubernetes ServiceAccount token)",
            )
        if hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return handler
        try:
            caller = await self.authenticator.authenticate(token)
        except FsbError as exc:
            return _refusing(handler, exc.grpc_code, f"cannot check the token: {exc.message}")
        if caller is None:
            return _refusing(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid API token: neither the controller's token nor a valid Kubernetes "
                "ServiceAccount token",
            )
        method = details.method.removeprefix(_SERVICE)
        if method == details.method or method not in RPC_ACCESS:
            return _refusing(
                handler, grpc.StatusCode.PERMISSION_DENIED, f"{details.method}: admin only"
            )

        async def check(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if request is None:  # a stream closed before its first message: nothing to allow
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty request stream")
            access = access_of(method, request)
            assert access is not None
            try:
                decision = await self.authorizer.authorize(caller, access)
            except FsbError as exc:
                await context.abort(exc.grpc_code, f"cannot check access: {exc.message}")
                return
            if not decision.allowed:
                why = f" ({decision.reason})" if decision.reason else ""
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{caller.name} may not {access.describe()}{why}",
                )

        return _wrap(handler, check)
