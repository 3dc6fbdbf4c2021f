"""Taking over work that other consumers left behind.

Redis reclaims nothing on its own: entries delivered to a consumer that died stay pending
under its name for good. Every consumer therefore runs a :class:`Claimer`: every
``claim_interval`` it takes over, in bulk, entries that have sat pending longer than
``claim_idle_ms`` (XAUTOCLAIM), and learns how often each was delivered (XPENDING). Live
workers renew their leases well inside that idle time, so only abandoned entries (a dead
or stuck consumer, or a job given back for retry) qualify. The delivery count is Redis'
own, so a job that keeps killing its worker is counted even though no process survives
to count it.

Entries trimmed while pending come back from XAUTOCLAIM as deleted ids (Redis 7.0+);
they are reported so the caller can dead-letter them instead of losing them silently.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis

from broker.streams import Entry


class Claimed(msgspec.Struct, frozen=True):
    """What one claim pass took over."""

    entries: list[tuple[Entry, int]]
    """Entries with their delivery counts (including this delivery)."""
    deleted: list[bytes]
    """Ids that were pending but whose entries no longer exist (trimmed or deleted)."""


class Claimer:
    """Claims idle entries of ``stream`` for ``consumer`` in group ``group``."""

    def __init__(self, client: aioredis.Redis, stream: str, group: str, consumer: str, *,
                 idle_ms: int, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.idle_ms = idle_ms
        self.interval_s = interval_s
        self.clock = clock
        self.cursor = b"0-0"
        self.next_at = 0.0
        self.claimed = 0

    def due(self) -> bool:
        """Whether a claim pass is due (one full scan of the pending list per interval)."""
        return self.clock() >= self.next_at

    async def claim(self, count: int) -> Claimed:
        """Take over up to ``count`` idle entries, continuing the scan where the last pass stopped."""
        got: list[Entry] = []
        deleted: list[bytes] = []
        while len(got) < count:
            reply = await self.client.xautoclaim(self.stream, self.group, self.consumer, self.idle_ms,
                                                 start_id=self.cursor, count=count - len(got))
            self.cursor = reply[0]
            for entry_id, fields in reply[1]:
                if fields:
                    got.append((entry_id, fields))
                else:  # Redis 6.2 returns a deleted entry as an id without fields
                    deleted.append(entry_id)
            if len(reply) > 2:
                deleted.extend(reply[2])
            if self.cursor in (b"0-0", "0-0"):
                self.cursor = b"0-0"
                self.next_at = self.clock() + self.interval_s
                break
        if not got:
            return Claimed([], deleted)
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _fields in got:
            pipe.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        counts = [rows[0]["times_delivered"] if rows else 1 for rows in await pipe.execute()]
        self.claimed += len(got)
        return Claimed(list(zip(got, counts, strict=True)), deleted)
