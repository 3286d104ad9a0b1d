"""The agent API on HOST:PORT as the Kubernetes fleet runs it: no SO_REUSEPORT (a second listener
on the agent's port fails), TLS with a certificate from the controller's agent CA, and a bearer
token of its own. A real grpc.aio agent server (FakeRuntime behind it) and the control plane's
real `AgentClients`."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fastsandbox import _tls
from fastsandbox.agent.runtime.fake import FakeRuntime
from fastsandbox.agent.server import run
from fastsandbox.control.agent_client import AgentClients
from fastsandbox.errors import Unauthenticated, Unavailable
from fastsandbox.fleet.base import AgentAuth
from fastsandbox.settings import AgentSettings
from tests.infra import free_port

NS = "team-a"
KEY = b"k" * 32


@dataclass
class TlsAgent:
    listen: str
    port: int
    ca: bytes
    name: str

    def auth(self, **override: object) -> AgentAuth:
        values: dict[str, object] = {
            "token": _tls.derive_token(KEY, f"{NS}/{self.name}"),
            "root_ca": self.ca,
            "server_name": _tls.agent_server_name(NS, self.name),
        }
        values.update(override)
        return AgentAuth(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return _tls.new_ca("test agent CA")


async def start_agent(
    tmp_path: Path, ca: tuple[bytes, bytes], name: str, *, tls: bool = True
) -> tuple[TlsAgent, asyncio.Event, asyncio.Task[None]]:
    port = free_port()
    cert_path = key_path = None
    if tls:
        server_name = _tls.agent_server_name(NS, name)
        cert, key = _tls.issue(*ca, server_name, dns_names=[server_name])
        cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        cert_path.write_bytes(cert)
        key_path.write_bytes(key)
    settings = AgentSettings(
        name=name,
        pool="p",
        namespace=NS,
        listen=f"127.0.0.1:{port}",
        state_dir=tmp_path / name,
        containerd_socket=tmp_path / "none.sock",
        token=_tls.derive_token(KEY, f"{NS}/{name}"),
        tls_cert=cert_path,
        tls_key=key_path,
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(settings, ready=ready, stop=stop, runtime=FakeRuntime()))
    await asyncio.wait_for(ready.wait(), 10)
    return TlsAgent(settings.listen, port, ca[0], name), stop, task


@pytest.fixture
async def agent(tmp_path: Path, ca: tuple[bytes, bytes]) -> AsyncIterator[TlsAgent]:
    agent, stop, task = await start_agent(tmp_path, ca, "agent-1")
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_tokens_are_per_agent_and_need_the_key() -> None:
    one, two = _tls.derive_token(KEY, "t/a1"), _tls.derive_token(KEY, "t/a2")
    assert one != two and len(one) >= 40
    assert _tls.derive_token(b"other" * 8, "t/a1") != one
    assert _tls.derive_token(KEY, "t/a1") == one  # every replica computes the same


async def test_a_second_listener_on_the_agents_port_fails(agent: TlsAgent) -> None:
    """A process sharing the agent's network namespace (a sandbox in its Pod) cannot take a
    share of its port with SO_REUSEPORT: the agent's socket does not set it."""
    for reuse in (True, False):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if reuse:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError) as info:
                sock.bind(("127.0.0.1", agent.port))
            assert info.value.errno == errno.EADDRINUSE
        finally:
            sock.close()
    # And a second gRPC server, with grpc's defaults (which set SO_REUSEPORT), cannot either.
    server = grpc.aio.server()
    try:
        with pytest.raises(RuntimeError):
            if server.add_insecure_port(agent.listen) == 0:
                raise RuntimeError("bind failed")
    finally:
        await server.stop(None)


async def test_tls_with_the_agents_own_token(agent: TlsAgent) -> None:
    clients = AgentClients(auth=lambda _target: agent.auth())
    try:
        assert (await clients.get(agent.listen).status()).agent_name == "agent-1"
    finally:
        await clients.close()


@pytest.mark.parametrize(
    ("override", "error", "said"),
    [
        # Another agent's token (each agent has its own): refused by this agent.
        (
            {"token": _tls.derive_token(KEY, f"{NS}/agent-2")},
            Unauthenticated,
            "invalid agent token",
        ),
        ({"token": None}, Unauthenticated, "missing agent token"),
        # The certificate names agent-1; a client that meant agent-2 refuses to talk to it.
        ({"server_name": _tls.agent_server_name(NS, "agent-2")}, Unavailable, "unreachable"),
        # A certificate from another CA is not the controller's agent.
        ({"root_ca": _tls.new_ca("stranger")[0]}, Unavailable, "unreachable"),
    ],
)
async def test_wrong_credentials_are_refused(
    agent: TlsAgent, override: dict[str, object], error: type[Exception], said: str
) -> None:
    clients = AgentClients(auth=lambda _target: agent.auth(**override))
    try:
        with pytest.raises(error, match=said):
            await clients.get(agent.listen).status(timeout=5)
    finally:
        await clients.close()


async def test_plaintext_does_not_reach_a_tls_agent(agent: TlsAgent) -> None:
    clients = AgentClients(token=agent.auth().token)
    try:
        with pytest.raises(Unavailable):
            await clients.get(agent.listen).status(timeout=5)
    finally:
        await clients.close()


async def test_a_new_agent_at_the_same_address_gets_a_new_channel(
    tmp_path: Path, ca: tuple[bytes, bytes]
) -> None:
    """Pod IPs are reused: the client cache must follow the fleet's answer for the address."""
    first, stop, task = await start_agent(tmp_path, ca, "agent-1")
    current = {"auth": first.auth()}
    clients = AgentClients(auth=lambda _target: current["auth"])
    try:
        assert (await clients.get(first.listen).status()).agent_name == "agent-1"
        stop.set()
        await asyncio.wait_for(task, 10)
        second, stop, task = await start_agent(tmp_path, ca, "agent-2")
        second.listen = first.listen  # pretend the address was reused
        current["auth"] = second.auth()
        assert clients.get(first.listen).auth == second.auth()
    finally:
        await clients.close()
        stop.set()
        await asyncio.wait_for(task, 10)
