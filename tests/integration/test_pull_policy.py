"""A failed pull through real containerd (`ctr images pull`) says what kind of failure it was,
never what the remote sent: a loopback HTTP server plays a registry that answers every request
with a body a request should not be able to read back."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.errors import FsbError, PermissionDenied
from tests.infra import ContainerdProc

pytestmark = pytest.mark.integration

SECRET = "instance-secret-7f3a"


class _Leaky(BaseHTTPRequestHandler):
    status = 500

    def _answer(self) -> None:
        body = f'{{"errors":[{{"code":"X","message":"{SECRET}"}}]}}'.encode()
        self.send_response(self.status, f"Oops {SECRET}")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture(params=[500, 401])
def leaky(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    handler = type("Handler", (_Leaky,), {"status": request.param})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", int(request.param)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
async def runtime(
    containerd: ContainerdProc, leaky: tuple[str, int], tmp_path: Path
) -> AsyncIterator[ContainerdRuntime]:
    rt = ContainerdRuntime(containerd.socket, "fsb-pull-policy", [leaky[0]], state_dir=tmp_path)
    try:
        yield rt
    finally:
        await rt.close()


async def test_a_failed_pull_does_not_echo_the_remote(
    runtime: ContainerdRuntime, leaky: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    addr, status = leaky
    caplog.set_level(logging.DEBUG, logger="fastsandbox.agent.runtime.containerd_images")
    with pytest.raises(FsbError) as info:
        await runtime.pull(f"{addr}/app:1")
    # ctr did repeat the remote's words (so a message built from its output would leak them);
    # they are in the agent's own log only.
    logged = [getattr(r, "stderr", "") for r in caplog.records if r.getMessage() == "pull failed"]
    assert any(SECRET in text for text in logged), logged
    message = info.value.message
    assert SECRET not in message and "Oops" not in message
    assert f"registry {addr}" in message
    if status == 401:
        assert isinstance(info.value, PermissionDenied)
    else:
        assert "HTTP 500" in message
