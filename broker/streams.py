"""Redis plumbing: connections, consumer groups, consumer names and retry backoff.

(redis-py types asyncio commands as ``Awaitable[T] | T``; the few ``type: ignore[misc]``
comments on awaited commands in this project are for that.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, DataError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.errors import RedisUnavailable

log = logging.getLogger("inference_broker")

Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as redis-py returns it: (id, fields)."""

def redacted(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None and "password" not in parts.query:
        return url
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=(f"{parts.username}:***@" if parts.username else "***@") + host)
    if "password" in parts.query:
        query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


class _HiredisPacking:
    """Packs commands with hiredis' C encoder instead of redis-py's Python loop.

    redis-py's synchronous client does this already; its asyncio connections do not, and
    packing was a sixth of a policy worker's CPU (bench/PROFILE.md): about 5.4 µs per
    routed job's command against 0.8 µs here.
    """

    def pack_command(self, *args: object) -> list[bytes]:
        # As redis-py: a command name with spaces ("XINFO GROUPS") is several arguments.
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]  # type: ignore[arg-type]
        except TypeError as exc:  # None, bool, a list: what redis-py's encoder refuses too
            # Not the arguments themselves: they may hold a job's payload or a password.
            raise DataError(f"cannot send {args[0]!r} to Redis: {exc}") from None


class _CancellableSend(AbstractConnection):
    """Sends under ``asyncio.timeout`` rather than redis-py's ``asyncio.wait_for``.

    In Python 3.11, ``wait_for`` runs the send as a task of its own, and when its caller is
    cancelled just as that task finishes, it returns as if nothing had happened (fixed in
    3.12). The cancellation is lost: a consumer loop told to stop that way reads on forever.
    ``wait_for`` also cost a task per command.
    """

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        timeout = self.socket_timeout
        if not timeout:
            return await super().send_packed_command(command, check_health)
        self.socket_timeout = None  # redis-py sends without wait_for; the timeout is this one
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        finally:
            self.socket_timeout = timeout


class _FastConnection(_HiredisPacking, _CancellableSend, Connection):
    pass


class _FastSSLConnection(_HiredisPacking, _CancellableSend, SSLConnection):
    pass


class _FastUnixConnection(_HiredisPacking, _CancellableSend, UnixDomainSocketConnection):
    pass


_FAST: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _FastConnection, SSLConnection: _FastSSLConnection, UnixDomainSocketConnection: _FastUnixConnection}


def connect(url: str, block_ms: int = 1000) -> aioredis.Redis:
    """A client for ``url`` that retries dropped connections with jittered backoff.

    The socket timeout exceeds the longest blocking read, so a quiet ``XREADGROUP BLOCK``
    is never mistaken for a dead connection. Commands are packed in C (hiredis), and a
    cancelled caller is never left running (see ``_CancellableSend``).
    """
    client = aioredis.Redis.from_url(
        url,
        socket_timeout=block_ms / 1000 + 10,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(cap=2.0, base=0.05), retries=5),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    pool = client.connection_pool
    pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
    return client


async def wait_ready(client: aioredis.Redis, url: str, timeout: float = 30.0) -> None:
    """Wait until Redis answers PING, or raise :class:`RedisUnavailable` saying what to do."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.05
    while True:
        try:
            await client.ping()  # type: ignore[misc]
            return
        except AuthenticationError as exc:
            # Waiting does not fix a wrong password: say so at once (without the password).
            raise RedisUnavailable(
                f"Redis at {redacted(url)} refused the credentials ({exc}). Check the user and password "
                "in --redis-url / REDIS_URL.") from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if loop.time() + delay > deadline:
                raise RedisUnavailable(
                    f"cannot reach Redis at {redacted(url)} after {timeout:.0f} s ({exc}). "
                    "Start Redis there, fix --redis-url / REDIS_URL, or leave both unset "
                    "to use an embedded server."
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> bool:
    """Create ``group`` on ``stream`` at id 0 (creating the stream too). Idempotent.

    Id 0, not ``$``: jobs added before the first consumer started are still delivered.
    Returns True if the group was created now.
    """
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
        return True
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise


def is_group_lost(exc: ResponseError) -> bool:
    """Whether a read failed because its stream or group is gone (deleted, or Redis restarted empty)."""
    text = str(exc)
    return "NOGROUP" in text or "no longer exists" in text


class Backoff:
    """Exponential backoff with full jitter, for retrying reads while Redis is unreachable."""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def delay(self) -> float:
        """Seconds to wait before the next try (counts a failure)."""
        self.failures += 1
        return random.uniform(0, min(self.cap, self.base * 2**self.failures))

    async def wait(self) -> None:
        await asyncio.sleep(self.delay())

    def reset(self) -> None:
        self.failures = 0


RETRYABLE = (RedisConnectionError, RedisTimeoutError, OSError)
"""Errors after which a role waits and tries again rather than exiting."""


async def every(period_s: float, action: Callable[[], Awaitable[object]], what: str,
                stop: asyncio.Event | None = None) -> None:
    """Run ``action`` every ``period_s`` until ``stop`` (or until cancelled, without one).

    A failure is logged and the action tried again next period.
    """
    while stop is None or not stop.is_set():
        try:
            await action()
        except RETRYABLE as exc:
            log.warning("%s failed: Redis unreachable (%s)", what, exc)
        except Exception:  # noqa: BLE001 - one failed round must not end the loop
            log.exception("%s failed", what)
        await asyncio.sleep(period_s)


def consumer_name(role: str) -> str:
    """A consumer name unique to this process: role, host, pid and a random suffix."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def pipeline(client: aioredis.Redis) -> Pipeline:
    """A non-transactional pipeline: each script is atomic on its own."""
    return client.pipeline(transaction=False)
