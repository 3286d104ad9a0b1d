"""A minimal asyncio HTTP endpoint: `GET /metrics` (Prometheus text format), `GET /healthz`
(the process is alive: its event loop answers) and `GET /readyz` (it accepts work: 200 only once
the process said it is ready, e.g. recovery done and an agent Ready; 503 with the reason before).

Why not prometheus_client's own `start_http_server`: it runs a thread with a WSGI server; this is
one more asyncio server in the process's own loop, started and stopped with it, and it serves
the probes Kubernetes uses as well. Requests are tiny and bounded (8 KiB of headers, 5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fastsandbox.metrics.names import Metrics

log = logging.getLogger(__name__)

_MAX_REQUEST = 8192
_READ_TIMEOUT = 5.0


@dataclass
class HealthState:
    """What /readyz answers; the process flips it (`ready()` / `not_ready(reason)`)."""

    is_ready: bool = False
    reason: str = "starting"

    def ready(self) -> None:
        self.is_ready, self.reason = True, "ready"

    def not_ready(self, reason: str) -> None:
        self.is_ready, self.reason = False, reason


class MetricsServer:
    def __init__(self, metrics: Metrics, health: HealthState, host: str, port: int) -> None:
        self.metrics = metrics
        self.health = health
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """HOST:PORT actually bound (port 0 picks a free one)."""
        if self._server is None:
            return f"{self._host}:{self._port}"
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("metrics and health on http://%s", self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def _answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            if self.health.is_ready:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", f"not ready: {self.health.reason}\n".encode()
        return 404, "text/plain", b"not found: /metrics, /healthz, /readyz\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_REQUEST:
                raise ValueError("request too large")
            method, path, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, ctype, body = self._answer(method, path)
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
            method = "GET"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}[status]  # fmt: skip
        head_out = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(head_out + (b"" if method == "HEAD" else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def serve_metrics(
    metrics: Metrics, health: HealthState, listen: str | None
) -> MetricsServer | None:
    """Start the endpoint on `listen` (HOST:PORT; a bracketed IPv6 host is fine); None: off."""
    if not listen:
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        from fastsandbox.errors import InvalidArgument

        raise InvalidArgument(f"--metrics-listen {listen!r}: must be HOST:PORT")
    server = MetricsServer(metrics, health, host.strip("[]") or "127.0.0.1", int(port))
    await server.start()
    return server
