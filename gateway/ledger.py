"""Batch records in Redis: what ``GET /v1/batches`` shows, and what a restarted gateway resumes.

Keys, all on the deployment's home shard (one slot on a cluster), expiring ``batch_retention_s``
after a batch's last change, so Redis holds a bounded number of them:

===================================  ======  ==============================================
key                                  type    holds
===================================  ======  ==============================================
``<home>:batch:<id>``                hash    ``record``: the :class:`Stored` batch (written
                                             by its runner only); ``cancel``: when a cancel
                                             was asked (written by the cancel call only)
``<home>:batches:<tenant>``          zset    the tenant's batch ids by creation time (list)
``<home>:batches-live``              set     batches not yet final (resumed at start)
``<home>:batches-live:<tenant>``     set     the tenant's batches not yet final (its limit)
``<home>:batches-lease``             string  the gateway that runs the batches (expires)
===================================  ======  ==============================================

(No tenant name makes one of these keys another's: ``batches-live`` has no tenant part,
and a tenant's keys differ from it after ``batches``.)

A cancel is its own field rather than a change to the record, so that a runner saving its
progress never overwrites it: a reader merges the two (:meth:`Ledger.load`).
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec
import redis.asyncio as aioredis

from broker.topology import Topology
from broker.wire import DECODE_ERRORS

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                      "cancelling", "cancelled"]
FINAL = frozenset({"failed", "completed", "expired", "cancelled"})
LONGEST_LIFE_S = 2 * 86_400
"""More than a batch takes from creation to final: its window (24 h) and a drain."""


class RequestCounts(msgspec.Struct, kw_only=True):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchErrors(msgspec.Struct, frozen=True, kw_only=True):
    data: list[BatchError]
    object: Literal["list"] = "list"


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """A batch as OpenAI's ``/v1/batches`` returns it (times: whole seconds since the epoch)."""

    id: str
    endpoint: str
    input_file_id: str
    status: BatchStatus
    created_at: int
    expires_at: int
    request_counts: RequestCounts
    completion_window: str = "24h"
    object: Literal["batch"] = "batch"
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    metadata: dict[str, str] | None = None


class Stored(msgspec.Struct, frozen=True, kw_only=True):
    """A batch and its owner: the tenant is never shown, and never taken from a request body."""

    tenant: str
    batch: Batch


_decode_stored = msgspec.json.Decoder(Stored).decode
_LEAD = """
local held = redis.call('GET', KEYS[1])
if held == false or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_GIVE_UP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Ledger:
    """Reads and writes batch records for one deployment."""

    def __init__(self, redis: aioredis.Redis, topo: Topology, retention_s: int) -> None:
        self.redis = redis
        self.home = topo.home
        self.retention_s = retention_s

    def _key(self, batch_id: str) -> str:
        return f"{self.home}:batch:{batch_id}"

    def _index(self, tenant: str) -> str:
        return f"{self.home}:batches:{tenant}"

    @property
    def _active(self) -> str:
        return f"{self.home}:batches-live"

    def _tenant_active(self, tenant: str) -> str:
        return f"{self.home}:batches-live:{tenant}"

    async def save(self, stored: Stored) -> None:
        """Write a batch's record (its runner, or its creation) and keep its indexes in step."""
        batch = stored.batch
        key = self._key(batch.id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, "record", msgspec.json.encode(stored).decode())
        pipe.expire(key, self.retention_s)
        index = self._index(stored.tenant)
        pipe.zadd(index, {batch.id: batch.created_at})
        # A record lives retention_s past its last change, at most a window and a drain after its
        # creation: entries older than that have no record any more.
        pipe.zremrangebyscore(index, "-inf", time.time() - self.retention_s - LONGEST_LIFE_S)
        pipe.expire(index, self.retention_s + LONGEST_LIFE_S)
        for active in (self._active, self._tenant_active(stored.tenant)):
            if batch.status in FINAL:
                pipe.srem(active, batch.id)
            else:
                pipe.sadd(active, batch.id)
                pipe.expire(active, self.retention_s + LONGEST_LIFE_S)
        await pipe.execute()

    async def load(self, batch_id: str, tenant: str | None = None) -> tuple[Stored, float | None] | None:
        """A batch's record and when a cancel was asked; ``None`` when missing, or of another ``tenant``."""
        fields = await self.redis.hgetall(self._key(batch_id))  # type: ignore[misc]
        try:
            stored = _decode_stored(fields[b"record"])
        except (KeyError, *DECODE_ERRORS):
            return None
        if tenant is not None and stored.tenant != tenant:
            return None
        cancel = fields.get(b"cancel")
        return stored, float(cancel) if cancel is not None else None

    async def ask_cancel(self, batch_id: str, at: float) -> None:
        """Record that a cancel was asked (the first time counts)."""
        await self.redis.hsetnx(self._key(batch_id), "cancel", repr(at))  # type: ignore[misc]

    async def page(self, tenant: str, after: str | None, limit: int) -> tuple[list[Batch], bool]:
        """The tenant's batches as shown, newest first (ids of one second by id: they sort by
        creation), from the one after ``after``; and whether more follow."""
        index = self._index(tenant)
        start = 0
        if after is not None:
            rank = await self.redis.zrevrank(index, after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = [i.decode() for i in await self.redis.zrevrange(index, start, start + limit)]
        batches = []
        for batch_id in ids[:limit]:
            found = await self.load(batch_id, tenant)
            if found is None:  # its record expired: forget it here too
                await self.redis.zrem(index, batch_id)
            else:
                batches.append(shown(*found))
        return batches, len(ids) > limit

    async def live(self, tenant: str) -> int:
        """How many of the tenant's batches are not yet final."""
        return int(await self.redis.scard(self._tenant_active(tenant)))  # type: ignore[misc]

    async def active(self) -> list[str]:
        """Ids of the batches not yet final."""
        return sorted(i.decode() for i in await self.redis.smembers(self._active))  # type: ignore[misc]

    async def lead(self, token: str, lease_ms: int) -> bool:
        """Take the lease of the gateway that runs the batches, or keep it: True while ``token`` holds it."""
        return bool(await self.redis.eval(_LEAD, 1, self._lease, token, lease_ms) == 1)  # type: ignore[misc]

    async def give_up(self, token: str) -> None:
        """Hand the lease back (if ``token`` holds it), so that another gateway takes over at once."""
        await self.redis.eval(_GIVE_UP, 1, self._lease, token)  # type: ignore[misc]

    @property
    def _lease(self) -> str:
        return f"{self.home}:batches-lease"

    async def forget(self, batch_id: str) -> None:
        """Drop a batch from the active set (its record is gone; its tenant's set expires)."""
        await self.redis.srem(self._active, batch_id)  # type: ignore[misc]


def shown(stored: Stored, cancel_at: float | None) -> Batch:
    """The batch as a reader sees it: asked to cancel and not final yet, it is ``cancelling``."""
    batch = stored.batch
    if cancel_at is not None and batch.status in ("validating", "in_progress"):
        return msgspec.structs.replace(batch, status="cancelling", cancelling_at=int(cancel_at))
    return batch
