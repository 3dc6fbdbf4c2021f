"""The connections of ``broker.streams.connect``: cancellation and send timeouts, on real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.streams import _FastConnection, connect


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
