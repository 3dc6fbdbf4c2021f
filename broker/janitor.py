"""Housekeeping that keeps Redis bounded and notices when it lost its data.

Run periodically by every policy worker (running it from several is harmless):

* **Result retention.** Result streams are trimmed (XTRIM MINID) below the oldest entry any
  consumer group still needs (its oldest pending entry, or the first it has not read) and
  below the retention age, never above either: unread and unacked results stay. A group
  that holds trimming back and none of whose consumers has read for
  ``results_group_idle_s`` was abandoned: it is destroyed, with a log line. A result stream
  left empty, unread by any group and idle past the retention age is deleted, and its name
  forgotten, in one step with the writers (a result arriving meanwhile is kept).
* **Dead-letter retention.** Dead letters older than ``dead_retention_s``, and the oldest
  beyond ``dead_max_len``, are deleted.
* **Consumer hygiene.** Consumers that hold no pending entries and have not read for twice
  the claim idle time (dead processes; live ones read every ``block_ms``) are removed.
* **Heartbeat expiry.** Heartbeats older than ``heartbeat_expiry_s`` (roles that died
  without removing theirs) are deleted.
* **Empty-restart detection.** An epoch key is written at start on each shard; if one
  disappears, the Redis holding that shard restarted without its data (or was flushed). That
  is logged loudly, counted, and the groups are recreated at 0 so the roles keep working.

Result streams, dead letters and epochs are per shard (each sweep covers every shard);
heartbeats are on shard 0.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis.asyncio as aioredis

from broker import calls
from broker.heartbeats import decoder_of, read_beats
from broker.scripts import Scripts
from broker.settings import Settings
from broker.topology import Topology

log = logging.getLogger("inference_broker.janitor")


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


class Janitor:
    """One deployment's housekeeping, over every shard."""

    def __init__(self, client: aioredis.Redis, settings: Settings, streams: dict[str, tuple[str, str]]) -> None:
        """``streams`` maps each consumed stream (of any shard) to (its group, the hash of its
        consumers' heartbeats)."""
        self.client = client
        self.scripts = Scripts(client)
        self.settings = settings
        self.topo = settings.topology
        self.streams = streams
        self.epochs: dict[int, bytes | None] = {}
        """Each shard's epoch marker as this janitor last saw it."""
        self.data_losses = 0
        self.trimmed = 0
        self.removed_consumers = 0
        self.expired_beats = 0
        self.dropped_groups = 0
        self.reaped = 0
        self.dead_trimmed = 0
        self.beats = sorted({heartbeats for _group, heartbeats in streams.values()})
        """Every heartbeat hash of the deployment's roles."""
        self._unread_since: dict[tuple[str, bytes], int] = {}
        """When this janitor first saw each consumerless group holding a result stream's trimming back (ms)."""

    async def start(self) -> None:
        """Record (or adopt) the epoch marker of every shard."""
        for topo in self.topo.every_shard:
            await self._mark(topo)

    async def _mark(self, topo: Topology) -> None:
        await self.client.set(topo.epoch, uuid.uuid4().hex, nx=True)
        self.epochs[topo.shard] = await self.client.get(topo.epoch)

    async def data_lost(self) -> bool:
        """True (once per loss) if a shard's epoch marker vanished since the last check."""
        lost = False
        for topo in self.topo.every_shard:
            current = await self.client.get(topo.epoch)
            if current is not None and current == self.epochs.get(topo.shard):
                continue
            lost = True
            self.data_losses += 1
            where = f" (shard {topo.shard}, keys {topo.base}:*)" if topo.shards > 1 else ""
            log.error("Redis lost this deployment's data%s (restarted without persistence, or flushed): "
                      "jobs queued or running at that moment are gone without an outcome; recreating groups", where)
            await self._mark(topo)
        return lost

    async def remove_dead_consumers(self, now: float) -> None:
        idle_limit = 2 * self.settings.claim_idle_ms
        fresh_s = self.settings.live_s
        for stream, (group, heartbeats) in self.streams.items():
            try:
                consumers = await self.client.xinfo_consumers(stream, group)
            except aioredis.ResponseError:
                continue  # stream or group not there (yet)
            fields = await self.client.hgetall(heartbeats)  # type: ignore[misc]
            beats = read_beats(fields, decoder_of(self.topo, heartbeats), heartbeats)
            for c in consumers:
                if c["pending"] or c["idle"] <= idle_limit:
                    continue
                # Before Redis 7.2 a blocked read that returns nothing does not reset `idle`:
                # a live consumer with nothing to do looks dead, but it still sends heartbeats.
                beat = beats.get(c["name"])
                if beat is not None and now - beat.ts < fresh_s:
                    continue
                if await self.scripts.call(calls.delconsumer(stream, group, c["name"])) != -1:
                    self.removed_consumers += 1

    async def trim_results(self, now_ms: int) -> None:
        """Trim every result stream of every shard; delete those left empty for good, and forget their names."""
        oldest_ms = now_ms - self.settings.results_retention_s * 1000
        seen: set[tuple[str, bytes]] = set()
        for topo in self.topo.every_shard:
            for path in await self.client.smembers(topo.replies):  # type: ignore[misc]
                await self.trim_stream(topo.under(path.decode()), oldest_ms, now_ms, seen)
                if await self.scripts.call(calls.reap(topo, path.decode(), oldest_ms)) == 1:
                    self.reaped += 1
        self._unread_since = {key: at for key, at in self._unread_since.items() if key in seen}

    async def trim_stream(self, stream: str, oldest_ms: int, now_ms: int, seen: set[tuple[str, bytes]]) -> None:
        """Trim ``stream`` below ``oldest_ms`` and below what every group still needs, but for
        groups abandoned for ``results_group_idle_s``: those are destroyed. Consumerless groups
        that hold trimming back are added to ``seen``."""
        floor = (oldest_ms, 0)
        try:
            groups = await self.client.xinfo_groups(stream)
        except aioredis.ResponseError:
            return
        newest: tuple[int, int] | None = None
        for g in groups:
            last = _id_tuple(g["last-delivered-id"])
            need = (last[0], last[1] + 1)
            if g["pending"]:
                summary = await self.client.xpending(stream, g["name"])
                need = min(need, _id_tuple(summary["min"]))
            if need < floor:
                # It holds trimming back if it has entries to read or ack (a caught-up group
                # whose reader waits for the next result does not, however long it waits).
                if newest is None:
                    tip = await self.client.xrevrange(stream, count=1)
                    newest = _id_tuple(tip[0][0]) if tip else (0, 0)
                if need <= newest and await self._abandoned(stream, g, now_ms, seen):
                    continue
            floor = min(floor, need)
        removed = await self.client.xtrim(stream, minid=f"{floor[0]}-{floor[1]}", approximate=False)
        self.trimmed += int(removed)

    async def _abandoned(self, stream: str, group: dict[str, Any], now_ms: int, seen: set[tuple[str, bytes]]) -> bool:
        """Destroy ``group``, which holds back the trimming of ``stream``, if none of its consumers
        has read for ``results_group_idle_s``; True if it was.

        A group without consumers (created, never read) has no idle time in Redis: it counts
        from when this janitor first saw it so, lest a reader that just created it lose it.
        """
        idle_ms = self.settings.results_group_idle_s * 1000
        if not group["consumers"]:
            key = (stream, group["name"])
            seen.add(key)
            if now_ms - self._unread_since.setdefault(key, now_ms) < idle_ms:
                return False
        if await self.scripts.call(calls.dropgroup(stream, group["name"], idle_ms)) != 1:
            return False
        self.dropped_groups += 1
        log.warning("destroyed consumer group %r of result stream %s: none of its consumers read for %d s "
                    "(abandoned), and it held back trimming with %s results unread and %d read but not acked",
                    group["name"].decode(errors="replace"), stream, self.settings.results_group_idle_s,
                    group.get("lag", "?"), group["pending"])
        return True

    async def trim_dead(self, now_ms: int) -> None:
        """Delete dead letters past ``dead_retention_s`` and the oldest beyond ``dead_max_len`` (each
        shard's: ``dead_max_len`` bounds each shard's dead-letter stream)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for topo in self.topo.every_shard:
                pipe.xtrim(topo.dead, minid=now_ms - self.settings.dead_retention_s * 1000, approximate=False)
                pipe.xtrim(topo.dead, maxlen=self.settings.dead_max_len, approximate=False)
            removed = sum(int(n) for n in await pipe.execute())
        if removed:
            self.dead_trimmed += removed
            log.info("deleted %d dead letters past their retention (dead_retention_s %d, dead_max_len %d)",
                     removed, self.settings.dead_retention_s, self.settings.dead_max_len)

    async def expire_heartbeats(self, now: float) -> None:
        """Delete heartbeats older than ``heartbeat_expiry_s``: their roles died without saying so."""
        removed = await self.scripts.call(calls.expire_beats(self.beats, now - self.settings.heartbeat_expiry_s))
        if removed:
            self.expired_beats += removed
            log.info("removed the heartbeats of %d roles silent for over %g s", removed,
                     self.settings.heartbeat_expiry_s)

    async def sweep(self, now: float) -> bool:
        """One round of housekeeping at ``now`` (epoch seconds). True if a data loss was detected."""
        lost = await self.data_lost()
        await self.expire_heartbeats(now)
        await self.remove_dead_consumers(now)
        await self.trim_results(int(now * 1000))
        await self.trim_dead(int(now * 1000))
        return lost


async def warn_if_evicting(client: aioredis.Redis) -> None:
    """Log a warning when Redis may evict keys (streams, i.e. queued jobs, included)."""
    try:
        # INFO, not CONFIG GET: a least-privilege user (broker/acl.py) may read INFO, while
        # CONFIG GET would show it every setting, passwords (requirepass, masterauth) included.
        policy = (await client.info("memory")).get("maxmemory_policy")
    except aioredis.ResponseError:
        return  # INFO may be renamed or denied on managed Redis: nothing to check
    if policy not in (None, "noeviction", b"noeviction"):
        log.warning("Redis maxmemory-policy is %r: it may evict streams, i.e. queued jobs. "
                    "Set it to noeviction (CONFIG SET maxmemory-policy noeviction).", policy)
