"""Housekeeping that keeps Redis bounded and notices when it lost its data.

Run periodically by every policy worker (running it from several is harmless):

* **Result retention.** Result streams are trimmed (XTRIM MINID) below the oldest entry any
  consumer group still needs (its oldest pending entry, or the first it has not read) and
  below the retention age, never above either: unread and unacked results stay.
* **Consumer hygiene.** Consumers that hold no pending entries and have not read for twice
  the claim idle time (dead processes; live ones read every ``block_ms``) are removed.
* **Empty-restart detection.** An epoch key is written at start; if it disappears, Redis
  restarted without its data (or was flushed). That is logged loudly, counted, and the
  groups are recreated at 0 so the roles keep working.
"""

from __future__ import annotations

import logging
import uuid

import msgspec
import redis.asyncio as aioredis

from broker.scripts import Scripts
from broker.settings import Settings

log = logging.getLogger("inference_broker.janitor")


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


class Janitor:
    """One deployment's housekeeping; ``streams`` maps each consumed stream to its group."""

    def __init__(self, client: aioredis.Redis, settings: Settings, streams: dict[str, tuple[str, str]]) -> None:
        """``streams`` maps each consumed stream to (its group, the hash of its consumers' heartbeats)."""
        self.client = client
        self.scripts = Scripts(client)
        self.settings = settings
        self.topo = settings.topology
        self.streams = streams
        self.epoch: bytes | None = None
        self.data_losses = 0
        self.trimmed = 0
        self.removed_consumers = 0

    async def start(self) -> None:
        """Record (or adopt) the epoch marker of this Redis."""
        await self.client.set(self.topo.epoch, uuid.uuid4().hex, nx=True)
        self.epoch = await self.client.get(self.topo.epoch)

    async def data_lost(self) -> bool:
        """True (once per loss) if the epoch marker vanished since the last check."""
        current = await self.client.get(self.topo.epoch)
        if current is not None and current == self.epoch:
            return False
        self.data_losses += 1
        log.error("Redis lost this deployment's data (restarted without persistence, or flushed): "
                  "jobs queued or running at that moment are gone without an outcome; recreating groups")
        await self.start()
        return True

    async def remove_dead_consumers(self, now: float) -> None:
        idle_limit = 2 * self.settings.claim_idle_ms
        fresh_s = 5 * self.settings.heartbeat_s
        for stream, (group, heartbeats) in self.streams.items():
            try:
                consumers = await self.client.xinfo_consumers(stream, group)
            except aioredis.ResponseError:
                continue  # stream or group not there (yet)
            beats = await self.client.hgetall(heartbeats)  # type: ignore[misc]
            for c in consumers:
                if c["pending"] or c["idle"] <= idle_limit:
                    continue
                # Before Redis 7.2 a blocked read that returns nothing does not reset `idle`:
                # a live consumer with nothing to do looks dead, but it still sends heartbeats.
                beat = beats.get(c["name"])
                if beat is not None and now - msgspec.json.decode(beat)["ts"] < fresh_s:
                    continue
                if await self.scripts.call("delconsumer", [stream], [group, c["name"]]) != -1:
                    self.removed_consumers += 1

    async def trim_results(self, now_ms: int) -> None:
        names = await self.client.smembers(self.topo.replies)  # type: ignore[misc]
        for name in names:
            await self.trim_stream(self.topo.reply(name.decode()), now_ms - self.settings.results_retention_s * 1000)

    async def trim_stream(self, stream: str, oldest_ms: int) -> None:
        """Trim ``stream`` below ``oldest_ms`` and below what every group still needs."""
        floor = (oldest_ms, 0)
        try:
            groups = await self.client.xinfo_groups(stream)
        except aioredis.ResponseError:
            return
        for g in groups:
            last = _id_tuple(g["last-delivered-id"])
            floor = min(floor, (last[0], last[1] + 1))
            if g["pending"]:
                summary = await self.client.xpending(stream, g["name"])
                floor = min(floor, _id_tuple(summary["min"]))
        removed = await self.client.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=False)
        self.trimmed += int(removed)

    async def sweep(self, now: float) -> bool:
        """One round of housekeeping at ``now`` (epoch seconds). True if a data loss was detected."""
        lost = await self.data_lost()
        await self.remove_dead_consumers(now)
        await self.trim_results(int(now * 1000))
        return lost


async def warn_if_evicting(client: aioredis.Redis) -> None:
    """Log a warning when Redis may evict keys (streams, i.e. queued jobs, included)."""
    try:
        policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
    except aioredis.ResponseError:
        return  # CONFIG is often disabled on managed Redis: nothing to check
    if policy not in (None, "noeviction", b"noeviction"):
        log.warning("Redis maxmemory-policy is %r: it may evict streams, i.e. queued jobs. "
                    "Set it to noeviction (CONFIG SET maxmemory-policy noeviction).", policy)
