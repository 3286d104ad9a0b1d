"""The agent's gRPC server: proto ⇄ `SandboxManager`, and the agent daemon's `run()`.

Errors become gRPC statuses in one place (`_abort`, through `FsbError.grpc_code`). On a unix
socket the file is made mode 0600: who may open the socket may drive the agent, so the socket's
permission is the agent API's authentication. On HOST:PORT (an agent in a Pod, serving on its
podIP) every call must carry the bearer token instead (`_grpc_auth.TokenAuth`); serving a
network address without one is refused unless `insecure_no_token` says so explicitly.

Stopping the agent never stops sandboxes; they belong to containerd's shims and are found again
by the next agent of the same name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc

from fastsandbox._grpc_auth import TokenAuth
from fastsandbox.agent.io_service import IoMethods
from fastsandbox.agent.manager import SandboxManager
from fastsandbox.agent.requests import SandboxRequest
from fastsandbox.agent.runtime.base import ContainerState, ContainerStatus, Runtime
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2, agent_pb2_grpc
from fastsandbox.api.images import PullCredentials
from fastsandbox.api.log_caps import MIN_LOG_MAX_BYTES
from fastsandbox.api.models import is_env_name
from fastsandbox.api.quantity import MIN_MEMORY_BYTES
from fastsandbox.errors import FsbError, InvalidArgument, Unavailable
from fastsandbox.metrics import HealthState, serve_metrics
from fastsandbox.settings import AgentSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

# In-flight calls get this long to finish on shutdown; log followers are ended before it starts.
SHUTDOWN_GRACE_SECONDS = 2.0


# The agent's own disk full or read-only: nothing the caller did wrong, and it may pass
# (tests/fault/test_disk.py), so UNAVAILABLE (retry later) with the OS's words, not INTERNAL.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


async def _abort(context: Context, exc: BaseException) -> NoReturn:
    if isinstance(exc, FsbError):
        await context.abort(exc.grpc_code, exc.message)
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        where = f": {exc.filename}" if exc.filename else ""
        # Read-only is not "full": say what the operator has to restore (seen in
        # tests/fault/test_readonly.py, which read "retry once space is back").
        back = "it is writable again" if exc.errno == errno.EROFS else "space is back"
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"the agent's disk: {exc.strerror}{where}; retry once {back}",
        )
    log.exception("agent call failed unexpectedly", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"agent error: {exc}")
    raise AssertionError("unreachable")


def state_to_proto(state: ContainerState) -> agent_pb2.SandboxState:
    exited = state.status is ContainerStatus.STOPPED
    # Stopped with no known code (e.g. its task vanished in a reboot) is not a success: -1.
    unknown = -1 if exited else 0
    exit_code = state.exit_code if state.exit_code is not None else unknown
    return agent_pb2.SandboxState(
        sandbox_id=state.id,
        container_id=state.id,
        state=state.status.value,
        pid=state.pid,
        exited=exited,
        exit_code=exit_code,
        started_at=state.started_at or 0.0,
        exited_at=state.exited_at or 0.0,
        labels=[agent_pb2.KeyValue(key=k, value=v) for k, v in sorted(state.labels.items())],
        reason=state.reason,
        pulled_ms=state.pulled_ms,
        warm=state.warm,
    )


# Sizes of a runtime spec: 0 means "the default", a negative one is a caller's error (found by
# tests/fuzz/test_agent_fuzz.py: pids_limit=-1 reached the OCI builder and answered INTERNAL).
# The kernel's PID_MAX_LIMIT; 10 000 CPUs.
MAX_PIDS_LIMIT = 4 * 1024 * 1024
MAX_CPU_MILLIS = 10_000_000
_SIZES = ("cpu_millis", "memory_bytes", "pids_limit", "disk_bytes", "log_max_bytes")


def request_from_proto(spec: agent_pb2.SandboxRuntimeSpec) -> SandboxRequest:
    for size in _SIZES:
        if getattr(spec, size) < 0:
            raise InvalidArgument(f"spec.{size}: must not be negative, got {getattr(spec, size)}")
    # What the control plane refuses too (tiny limits fail inside runc, as INTERNAL otherwise).
    for size, least in (("memory_bytes", MIN_MEMORY_BYTES), ("log_max_bytes", MIN_LOG_MAX_BYTES)):
        value = getattr(spec, size)
        if 0 < value < least:
            raise InvalidArgument(
                f"spec.{size}: at least {least} bytes (0: the default), got {value}"
            )
    # Above what the kernel takes (pids.max, the CFS quota): refused here, not inside runc.
    for size, most in (("pids_limit", MAX_PIDS_LIMIT), ("cpu_millis", MAX_CPU_MILLIS)):
        value = getattr(spec, size)
        if value > most:
            raise InvalidArgument(f"spec.{size}: at most {most}, got {value}")
    # As the control plane's model checks it (found by tests/fuzz/test_agent_fuzz.py at 10 000
    # cases: a relative one reached runc, "Cwd must be an absolute path", as INTERNAL).
    if spec.working_dir and not spec.working_dir.startswith("/"):
        raise InvalidArgument(
            f"spec.working_dir: must be an absolute path, got {spec.working_dir!r}"
        )
    # Found by tests/fuzz/test_agent_fuzz.py at 10 000 cases: an empty env name reached runc
    # ("environment variable ... ") as INTERNAL; a NUL cannot pass exec(2) either.
    for i, kv in enumerate(spec.env):
        if not is_env_name(kv.key):
            raise InvalidArgument(
                f"spec.env[{i}].key: {kv.key!r} is not an environment variable name (letters, "
                "digits, '_', '-' or '.', not starting with a digit)"
            )
        if "\0" in kv.value:
            raise InvalidArgument(f"spec.env[{i}].value: must not contain a NUL byte")
    for field_name in ("command", "args"):
        for i, word in enumerate(getattr(spec, field_name)):
            if "\0" in word:
                raise InvalidArgument(f"spec.{field_name}[{i}]: must not contain a NUL byte")
    return SandboxRequest(
        sandbox_id=spec.sandbox_id,
        image=spec.image,
        namespace=spec.namespace,
        name=spec.name,
        command=tuple(spec.command),
        args=tuple(spec.args),
        env=tuple((kv.key, kv.value) for kv in spec.env),
        working_dir=spec.working_dir,
        exposed_ports=tuple(spec.exposed_ports),
        labels={kv.key: kv.value for kv in spec.labels},
        cpu_millis=spec.cpu_millis,
        memory_bytes=spec.memory_bytes,
        pids_limit=spec.pids_limit,
        disk_bytes=spec.disk_bytes,
        log_max_bytes=spec.log_max_bytes,
        pull_credentials=_credentials(spec),
    )


def _credentials(spec: agent_pb2.SandboxRuntimeSpec) -> PullCredentials | None:
    if not spec.pull_username and not spec.pull_password:
        return None
    return PullCredentials(spec.pull_username, spec.pull_password)


class AgentService(IoMethods, agent_pb2_grpc.AgentServicer):
    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self.settings = manager.settings

    async def _guard(self, context: Context, call: Awaitable[T]) -> T:
        try:
            return await call
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    async def CreateSandbox(
        self, request: agent_pb2.CreateSandboxRequest, context: Context
    ) -> agent_pb2.CreateSandboxResponse:
        try:
            req = request_from_proto(request.spec)
        except InvalidArgument as exc:
            await _abort(context, exc)
        state = await self._guard(context, self.manager.create(req))
        return agent_pb2.CreateSandboxResponse(sandbox=state_to_proto(state))

    async def DeleteSandbox(
        self, request: agent_pb2.DeleteSandboxRequest, context: Context
    ) -> agent_pb2.DeleteSandboxResponse:
        existed = await self._guard(
            context,
            self.manager.delete(
                request.sandbox_id, request.grace_seconds, keep_logs=request.keep_logs
            ),
        )
        return agent_pb2.DeleteSandboxResponse(existed=existed)

    async def Status(
        self, request: agent_pb2.StatusRequest, context: Context
    ) -> agent_pb2.StatusResponse:
        status = await self._guard(context, self.manager.status())
        s = self.settings
        return agent_pb2.StatusResponse(
            agent_name=s.name,
            pool=s.pool,
            namespace=s.namespace,
            agent_ip=s.agent_ip,
            capacity=s.capacity,
            images=sorted({i.name for i in status.images}),
            sandboxes=[state_to_proto(st) for st in status.sandboxes],
            runtime=s.runtime,
            version=s.version,
            cordoned=status.cordoned,
            used_slots=status.used_slots,
            creating=status.creating,
            warm_slots=[agent_pb2.WarmSlotCount(image=w.image, ready=w.ready) for w in status.warm],
        )

    async def Cordon(
        self, request: agent_pb2.CordonRequest, context: Context
    ) -> agent_pb2.CordonResponse:
        changed = self.manager.cordon(request.cordon)
        return agent_pb2.CordonResponse(cordoned=self.manager.cordoned, changed=changed)

    async def PullImage(
        self, request: agent_pb2.PullImageRequest, context: Context
    ) -> agent_pb2.PullImageResponse:
        result = await self._guard(context, self.manager.pull(request.image))
        return agent_pb2.PullImageResponse(
            image=result.image.name, digest=result.image.digest, seconds=result.seconds
        )

    async def Logs(
        self, request: agent_pb2.SandboxLogsRequest, context: Context
    ) -> AsyncIterator[agent_pb2.LogData]:
        stream = self.manager.logs(
            request.sandbox_id,
            follow=request.follow,
            tail_lines=request.tail_lines,
            since_unix=request.since_unix,
        )
        try:
            async for chunk in stream:
                yield agent_pb2.LogData(
                    data=chunk.data, stream=chunk.stream, timestamp=chunk.timestamp
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort(context, exc)
        finally:
            await stream.aclose()


def _socket_path(listen: str) -> Path | None:
    return Path(listen.removeprefix("unix://")) if listen.startswith("unix:") else None


# No SO_REUSEPORT (grpc sets it by default): in a Pod, sandboxes share the agent's network
# namespace, and a second listener on the agent's port would take a share of its connections,
# and with them the controller's bearer token. A second bind must fail instead.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


def _bind(server: grpc.aio.Server, settings: AgentSettings) -> None:
    """Listen on `unix:///path` (mode 0600) or HOST:PORT (TLS when a certificate is given)."""
    listen = settings.listen
    path = _socket_path(listen)
    if path is None:
        if settings.tls_cert is not None and settings.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
            )
            port = server.add_secure_port(listen, credentials)
        else:
            port = server.add_insecure_port(listen)
        if port == 0:
            raise Unavailable(f"cannot listen on {listen}: address in use or invalid")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket left by a killed agent
    # The umask closes the window between bind and chmod in which others could connect.
    old = os.umask(0o177)
    try:
        port = server.add_insecure_port(f"unix://{path}")
    finally:
        os.umask(old)
    if port == 0:
        raise Unavailable(f"cannot listen on {listen}")
    path.chmod(0o600)


def _interceptors(settings: AgentSettings) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    if settings.token:
        return [
            TokenAuth(
                settings.token,
                exempt=(),
                missing="missing agent token: the control plane must send this agent's token",
                invalid="invalid agent token: not this agent's token (each agent has its own)",
            )
        ]
    if settings.listens_on_tcp and not settings.insecure_no_token:
        raise InvalidArgument(
            f"agent listens on {settings.listen} without a token: give one "
            "(--token-file / $FSB_AGENT_TOKEN) or pass --insecure-no-token"
        )
    if settings.listens_on_tcp:
        log.warning(
            "agent API open to anyone who reaches the port (--insecure-no-token)",
            extra={"agent": settings.name, "listen": settings.listen},
        )
    return []


async def serve(
    manager: SandboxManager, *, ready: asyncio.Event | None, stop: asyncio.Event
) -> None:
    """Serve `manager` on `manager.settings.listen` until `stop`; the caller owns the runtime."""
    settings = manager.settings
    interceptors = _interceptors(settings)
    health = HealthState(reason="adopting the sandboxes already running")
    metrics = await serve_metrics(manager.metrics, health, settings.metrics_listen)
    try:
        await manager.start()
    except BaseException:
        if metrics is not None:
            await metrics.stop()
        raise
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    agent_pb2_grpc.add_AgentServicer_to_server(AgentService(manager), server)
    _bind(server, settings)
    await server.start()
    try:
        log.info(
            "agent ready",
            extra={
                "agent": settings.name,
                "pool": settings.pool,
                "listen": settings.listen,
                "capacity": settings.capacity,
                "sandboxes": manager.used_slots,
            },
        )
        health.ready()
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("agent stopping", extra={"agent": settings.name})
    finally:
        health.not_ready("stopping")
        if metrics is not None:
            await metrics.stop()
        # Order: end log followers, stop accepting and let in-flight calls finish briefly.
        manager.close()
        await server.stop(grace=SHUTDOWN_GRACE_SECONDS)
        await manager.aclose()
        path = _socket_path(settings.listen)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


async def run(
    settings: AgentSettings,
    *,
    ready: asyncio.Event | None,
    stop: asyncio.Event,
    runtime: Runtime | None = None,
) -> None:
    """The agent daemon. Builds a `ContainerdRuntime` from `settings` unless given `runtime`
    (tests pass a fake; a given runtime is not closed here)."""
    if settings.pod_uid:
        from fastsandbox.agent.pod import join_pod

        settings = await join_pod(settings)
    owned = runtime is None
    if runtime is None:
        from fastsandbox.agent.runtime.containerd import ContainerdRuntime
        from fastsandbox.agent.runtime.spare_layers import DEFAULT_SPARE_LAYERS

        runtime = ContainerdRuntime(
            settings.containerd_socket,
            settings.containerd_namespace,
            settings.insecure_registries,
            state_dir=settings.state_dir / "runtime",
            containerd_state=settings.containerd_state,
            spare_layers=DEFAULT_SPARE_LAYERS,
        )
    try:
        await serve(SandboxManager(runtime, settings), ready=ready, stop=stop)
    finally:
        if owned:
            await runtime.close()
        log.info("agent stopped", extra={"agent": settings.name})
