"""The connections of ``broker.connection.connect``: cancellation and send timeouts, on real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.connection import _FastConnection, connect, wait_ready
from broker.errors import RedisUnavailable
from tests.conftest import TlsRedis
from tests.helpers import fails_at_once


async def test_a_cancelled_command_always_stops_its_caller(redis_url: str) -> None:
    # redis-py sends through asyncio.wait_for, which in Python 3.11 loses a cancellation that
    # arrives as the send finishes: the caller went on as if never cancelled. Cancel at each
    # step of a command's first event-loop turns; every accepted cancellation must stop it.
    client = connect(redis_url)
    try:
        await client.ping()
        for turns in range(1, 10):
            task = asyncio.create_task(client.xread({"no-such-stream": "$"}, block=200))
            for _ in range(turns):
                await asyncio.sleep(0)
            if task.cancel():
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                await task
        assert await client.ping()  # the client is still usable afterwards
    finally:
        await client.aclose()


@pytest.fixture
def deaf_server() -> Iterator[int]:
    """A TCP port that accepts connections and never reads from them."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before listen: connections inherit it
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


async def test_a_send_that_cannot_finish_times_out(deaf_server: int) -> None:
    # driver_info=None: no CLIENT SETINFO on connect, whose reply would never come.
    conn = _FastConnection(host="127.0.0.1", port=deaf_server, socket_timeout=0.3, driver_info=None)
    await conn.connect()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RedisTimeoutError, match="writing"):
        await conn.send_packed_command(b"x" * (64 << 20), check_health=False)
    assert 0.25 < loop.time() - started < 5
    assert not conn.is_connected  # dropped: half a command may be on the wire


def _plaintext_url(tls: TlsRedis) -> str:
    return f"redis://127.0.0.1:{tls.port}/0"


def _untrusted_url(tls: TlsRedis) -> str:
    return f"rediss://127.0.0.1:{tls.port}/0"


def _tls_to_plaintext_url(redis_url: str) -> str:
    return redis_url.replace("redis://", "rediss://", 1)


@pytest.mark.parametrize(("make_url", "says", "within_s"), [
    # The TLS server's certificate, without its CA: nothing will change on retry.
    (lambda tls, plain: _untrusted_url(tls), ["does not trust", "IB_REDIS_TLS_CA", "ssl_ca_certs"], 4),
    # Plaintext against the TLS port: the server drops the connection at the first command.
    (lambda tls, plain: _plaintext_url(tls), ["accepts only TLS", "rediss://"], 4),
    # TLS against a plaintext server: the handshake waits out the 5 s connect timeout once.
    (lambda tls, plain: _tls_to_plaintext_url(plain), ["does not speak TLS", "redis://"], 12),
], ids=["untrusted-certificate", "plaintext-to-tls", "tls-to-plaintext"])
async def test_a_url_that_cannot_work_fails_at_once_saying_why(
        tls_redis: TlsRedis, redis_url: str, make_url: Callable[[TlsRedis, str], str], says: list[str],
        within_s: float) -> None:
    # It used to be retried for wait_ready's 30 s (and each command's retries), then reported
    # as a bare "connection reset" or "timeout".
    said = await fails_at_once(make_url(tls_redis, redis_url), within_s)
    for words in says:
        assert words in said


async def test_a_tls_url_with_its_ca_works(tls_redis: TlsRedis) -> None:
    client = connect(tls_redis.url)
    try:
        await wait_ready(client, tls_redis.url, timeout=10)
        assert await client.set("tls-check", b"1") and await client.get("tls-check") == b"1"
    finally:
        await client.aclose()


async def test_a_server_that_is_down_is_still_waited_for() -> None:
    # Not a misconfiguration: a role started before Redis waits for it, as before.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    client = connect(url)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(RedisUnavailable, match="connection refused") as caught:
            await wait_ready(client, url, timeout=2)
    finally:
        await client.aclose()
    assert loop.time() - started >= 1.5
    assert "was unreachable for 2 s" in str(caught.value) and "try:" in str(caught.value)


async def test_a_write_on_a_transport_closed_under_it_is_a_lost_connection(redis_url: str) -> None:
    # A cluster node killed under a pipeline left a closed transport, and uvloop's write
    # raised RuntimeError: a policy worker stopped on it instead of retrying.
    client = connect(redis_url)
    try:
        assert await client.ping()
        connection = client.connection_pool._available_connections[0]  # type: ignore[attr-defined]
        connection._writer.transport.close()
        assert await client.ping()  # retried on a new connection, as any lost connection is
    finally:
        await client.aclose()
