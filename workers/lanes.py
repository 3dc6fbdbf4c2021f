"""The priority lanes of a pool, and how one worker reads new entries across them.

A pool has one stream per class priority, lane 0 the most urgent. Each lane below the
first keeps its share of a worker's slots (``PolicyConfig.lane_shares``, a class's
``min_share``) whenever it has work queued; the worker fills its other free slots from
lane 0 first and reads a lane only while every lane above it is empty: interactive work
goes ahead of batch work, batch work fills idle capacity, and no sustained interactive
load starves it. The simulator's slot model mirrors this order (docs/architecture.md).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import msgspec
import redis.asyncio as aioredis

from broker.calls import CompleteTarget
from broker.reclaim import Claimer
from broker.scripts import Scripts
from broker.settings import Settings
from broker.streams import Entry
from broker.topology import WORKER_GROUP
from policies.config import reserved_slots

Taken = tuple["Lane", Entry, int]
"""An entry read or claimed from a lane, with its delivery count."""


class Lane(msgspec.Struct):
    """One priority lane of the pool: its stream, where its errors are kept, its claimer."""

    index: int
    stream: str
    errors: str
    claimer: Claimer
    completes: CompleteTarget
    """Where this worker's COMPLETE calls for the lane go (fenced on its name)."""
    cursor: str = "0-0"
    """Our own pending entries first (a restart under the same name), then ``>``: new ones.
    The lane's claims wait until then (see ``PoolWorker._claim``)."""
    suspects_waiting: bool = False
    """Its last claim pass saw suspects it left for when a sandbox is free."""


def pool_lanes(scripts: Scripts, settings: Settings, pool: str, name: str, count: int, *,
               suspects: bool) -> list[Lane]:
    """The ``count`` lanes of ``pool`` as worker ``name`` consumes them.

    With ``suspects`` (the worker has sandboxes), the claimers tell apart entries whose last
    run only died with its worker (:mod:`broker.reclaim`): they read the lanes' error hashes.
    """
    topo = settings.topology
    return [Lane(i, topo.pool(pool, i), topo.errors(pool, i), Claimer(
        scripts, topo.pool(pool, i), WORKER_GROUP, name, idle_ms=settings.claim_idle_ms,
        interval_s=settings.claim_interval_s, error_prefix=topo.errors(pool, i) if suspects else ""),
        CompleteTarget(topo.pool(pool, i), WORKER_GROUP, name, topo, settings.result_ttl_s * 1000))
        for i in range(count)]


class LaneReader:
    """Reads new entries (and its own pending ones after a restart) for a worker of ``concurrency`` slots."""

    def __init__(self, client: aioredis.Redis, lanes: list[Lane], name: str, *, concurrency: int,
                 shares: Sequence[float], block_ms: int) -> None:
        self.client = client
        self.lanes = lanes
        self.name = name
        self.block_ms = block_ms
        self.reserved = reserved_slots((*shares, *[0.0] * len(lanes))[:len(lanes)], concurrency)
        """Slots each lane keeps for its own work (``PolicyConfig.lane_shares``, ``reserved_slots``)."""
        self._lane_of = {lane.stream.encode(): lane for lane in lanes}
        """Lanes by stream key, as XREADGROUP names them."""

    async def read(self, free: int, held: collections.Counter[int]) -> list[Taken]:
        """Up to ``free`` entries; blocks while every lane is empty. ``held``: the worker's jobs per lane.

        First each lane below the first up to its reserved slots (``reserved``, counting its
        jobs here), then most urgent lane first: more urgent work cannot starve a lane, and
        reserved slots that a lane leaves unused go to the others.
        """
        got: list[Taken] = []
        drained: set[int] = set()
        for lane in self.lanes[1:]:
            want = min(self.reserved[lane.index] - held[lane.index], free - len(got))
            if want > 0:
                taken = await self._take(lane, want)
                if len(taken) < want:
                    drained.add(lane.index)
                got += taken
        for lane in self.lanes:
            if len(got) >= free:
                return got
            if lane.index not in drained:
                got += await self._take(lane, free - len(got))
        if got or len(self.lanes) == 1 or any(lane.cursor != ">" for lane in self.lanes):
            return got
        # Every lane is empty: wait for the first entry on any of them. One entry per lane at
        # most, so a wake-up takes no more than a lane's share of a peer's work.
        reply = await self.client.xreadgroup(WORKER_GROUP, self.name, {lane.stream: ">" for lane in self.lanes},
                                             count=1, block=self.block_ms)
        return [(self._lane_of[stream], entry, 1) for stream, entries in reply or [] for entry in entries]

    async def _take(self, lane: Lane, want: int) -> list[Taken]:
        """Up to ``want`` entries of ``lane``: our own pending ones first (see ``Lane.cursor``), then new ones."""
        own = lane.cursor != ">"
        # A single lane blocks here; several block together in `read`, once all are empty.
        reply = await self.client.xreadgroup(WORKER_GROUP, self.name, {lane.stream: lane.cursor}, count=want,
                                             block=None if own or len(self.lanes) > 1 else self.block_ms)
        entries: list[Entry] = reply[0][1] if reply else []
        if own:
            # Walk our own pending list past what we have taken, then switch to new entries.
            lane.cursor = entries[-1][0].decode() if len(entries) == want else ">"
        return [(lane, entry, 2 if own else 1) for entry in entries]
