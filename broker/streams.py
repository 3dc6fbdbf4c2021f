"""Stream plumbing: consumer groups, backlogs, consumer names, retry backoff and bounded loops."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import (
    RedisError,
    ResponseError,
)

from broker.connection import RETRYABLE, unavailable

log = logging.getLogger("inference_broker")
T = TypeVar("T")
Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as redis-py returns it: (id, fields)."""


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


async def every(period_s: float, action: Callable[[], Awaitable[object]], what: str,
                stop: asyncio.Event | None = None) -> None:
    """Run ``action`` every ``period_s`` until ``stop`` (or until cancelled, without one).

    A failure is logged and the action tried again next period.
    """
    while stop is None or not stop.is_set():
        try:
            await action()
        except RETRYABLE as exc:
            log.warning("%s failed: %s", what, unavailable(exc))
        except Exception:  # noqa: BLE001 - one failed round must not end the loop
            log.exception("%s failed", what)
        await asyncio.sleep(period_s)


STOP_TIMEOUT_S = 2.0
"""How long a stopping role, or a closing client, waits on Redis for each step of leaving:
its last read, giving back unfinished work and removing its heartbeat, closing its
connections. Redis may be down, or frozen (it accepts connections and never answers): a
call would then wait out the socket timeout once per connection retry, over a minute.
What is not done in time stays pending and is taken over after ``claim_idle_ms``, or
expires with the heartbeat expiry."""


async def until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event, leave_s: float) -> bool:
    """Await ``work``, a loop that ends by itself once ``stop`` is set, but once ``stop`` is set
    give it only ``leave_s`` more seconds: then cancel it. False if it had to be cancelled.

    A loop checks ``stop`` between Redis calls, and one of them may never be answered.
    Cancelling it is safe: whatever it read and did not start stays pending in its group.
    """
    task = asyncio.create_task(work)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=leave_s)
        if task.done():
            task.result()  # its own exception, if it failed
            return True
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
        return False
    finally:
        stopping.cancel()
        task.cancel()  # when we were cancelled ourselves


async def briefly(call: Awaitable[object], what: str) -> bool:
    """Await ``call``, a stopping role's last word to Redis, for :data:`STOP_TIMEOUT_S` at most.

    False, with a warning naming ``what``, when Redis failed or did not answer in time.
    """
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await call
        return True
    except (TimeoutError, RedisError, OSError) as exc:
        why = f"no answer within {STOP_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError) else unavailable(exc)
        log.warning("while stopping, could not %s: %s", what, why)
        return False


def group_backlog(groups: object, length: object, group: str) -> tuple[int, int]:
    """(queued, pending) of ``group`` on a stream, from its XINFO GROUPS and XLEN replies.

    Queued is the group's lag: entries none of its consumers has read yet. Pending: read and
    not yet acked. Without a lag (Redis 6.2, or a deletion after the group's last read hides
    it), the queued entries are the stream's length less the pending ones: the broker
    deletes handled entries, so what is left is pending or unread. A missing stream (an
    error reply: nothing was sent there yet) has neither; a stream without the group has
    only unread entries.
    """
    size = length if isinstance(length, int) else 0
    if not isinstance(groups, list):
        return 0, 0
    for found in groups:
        if found["name"] == group.encode():
            pending, lag = int(found["pending"] or 0), found.get("lag")
            return max(0, int(lag) if lag is not None else size - pending), pending
    return size, 0


def consumer_name(role: str) -> str:
    """A consumer name unique to this process: role, host, pid and a random suffix."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def pipeline(client: aioredis.Redis) -> Pipeline:
    """A non-transactional pipeline: each script is atomic on its own."""
    return client.pipeline(transaction=False)
