"""The SDK's shared channels (`fastsandbox.sdk._channels`): clients of one loop to one server use
one connection, kept open a while after the last closes, never across loops or trust settings,
and a channel in reconnect backoff is not handed to a new client."""

from __future__ import annotations

import asyncio
import socket

import grpc

from fastsandbox.sdk import AsyncClient, _channels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _client(endpoint: str, **kw: object) -> AsyncClient:
    return AsyncClient(endpoint, "t", "default", insecure=True, **kw)  # type: ignore[arg-type]


def _shutdown(lease: _channels.Lease) -> bool:
    state = lease.channel.get_state(try_to_connect=False)
    return state is grpc.ChannelConnectivity.SHUTDOWN


async def test_clients_of_one_loop_share_a_channel_that_outlives_them_a_while() -> None:
    endpoint = f"127.0.0.1:{_free_port()}"
    first, second = _client(endpoint), _client(endpoint)
    first._fastpath()
    second._fastpath()
    lease = first._channel
    assert lease is not None and second._channel is lease and lease.users == 2
    other = _client(f"127.0.0.1:{_free_port()}")
    other._fastpath()
    assert other._channel is not lease  # another server: another channel
    await first.close()
    await second.close()
    await other.close()
    # Idle, not closed: the next client takes it back.
    assert lease.users == 0 and not _shutdown(lease)
    third = _client(endpoint)
    third._fastpath()
    assert third._channel is lease and lease.idle is None
    third._linger = 0.05
    await third.close()
    for _ in range(100):
        if _shutdown(lease):
            break
        await asyncio.sleep(0.02)
    assert _shutdown(lease), "an idle channel was not closed after its linger"
    fresh = _client(endpoint)
    fresh._fastpath()
    assert fresh._channel is not lease
    fresh._linger = 0
    await fresh.close()


async def test_no_linger_closes_at_once() -> None:
    client = _client(f"127.0.0.1:{_free_port()}")
    client._fastpath()
    lease = client._channel
    assert lease is not None
    client._linger = 0
    await client.close()
    assert _shutdown(lease)


async def test_a_channel_in_reconnect_backoff_is_not_handed_out() -> None:
    endpoint = f"127.0.0.1:{_free_port()}"  # nothing listens: the connect fails
    client = _client(endpoint)
    client._fastpath()
    lease = client._channel
    assert lease is not None
    lease.channel.get_state(try_to_connect=True)
    for _ in range(200):
        if _channels._failing(lease.channel):
            break
        await asyncio.sleep(0.01)
    assert _channels._failing(lease.channel)
    later = _client(endpoint)
    later._fastpath()
    assert later._channel is not lease
    # The first client still uses its own channel until it closes; then it is closed at once.
    assert not _shutdown(lease)
    await client.close()
    assert _shutdown(lease)
    later._linger = 0
    await later.close()


def test_loops_do_not_share_and_a_finished_loop_closes_its_idle_channel() -> None:
    endpoint = f"127.0.0.1:{_free_port()}"

    async def one() -> _channels.Lease:
        client = _client(endpoint)
        client._fastpath()
        lease = client._channel
        assert lease is not None
        await client.close()  # lingers
        return lease

    first = asyncio.run(one())
    assert _shutdown(first)  # asyncio.run cancelled the wait, which closed it
    second = asyncio.run(one())
    assert second is not first


async def test_forget_makes_the_next_client_connect_anew() -> None:
    endpoint = f"127.0.0.1:{_free_port()}"
    held, idle = _client(endpoint), _client(f"127.0.0.1:{_free_port()}")
    held._fastpath()
    idle._fastpath()
    held_lease, idle_lease = held._channel, idle._channel
    assert held_lease is not None and idle_lease is not None
    await idle.close()
    assert not _shutdown(idle_lease)  # lingering
    _channels.forget()
    fresh = _client(endpoint)
    fresh._fastpath()
    assert fresh._channel is not held_lease
    assert not _shutdown(held_lease)  # still in use by `held`
    for _ in range(100):  # the idle one's wait ends, closing it
        if _shutdown(idle_lease):
            break
        await asyncio.sleep(0.01)
    assert _shutdown(idle_lease)
    await held.close()
    assert _shutdown(held_lease)
    fresh._linger = 0
    await fresh.close()
