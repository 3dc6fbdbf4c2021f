"""The priority lanes of a pool on every shard, and how one worker reads new entries across them.

A pool has one stream per class priority on each shard of the deployment, priority 0 the
most urgent. Each priority below the first keeps its share of a worker's slots
(``PolicyConfig.lane_shares``, a class's ``min_share``) whenever it has work queued on any
shard; the worker fills its other free slots from priority 0 first and reads a priority only
while every lane above it is empty: interactive work goes ahead of batch work, batch work
fills idle capacity, and no sustained interactive load starves it. The simulator's slot
model mirrors this order (docs/architecture.md). Within one priority the shards take turns
at coming first, so no shard's work always waits for the others'.

Every read names the streams of one shard only (one hash tag, one cluster slot): a job's
entry, and every key its outcome touches, stay on its shard (:mod:`broker.topology`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Sequence

import msgspec
import redis.asyncio as aioredis

from broker.calls import CompleteTarget
from broker.reclaim import Claimer
from broker.scripts import Scripts
from broker.settings import Settings
from broker.streams import STOP_TIMEOUT_S, Entry
from broker.topology import WORKER_GROUP, Topology
from broker.wire import RoutedJob
from policies.config import reserved_slots

Taken = tuple["Lane", Entry, int]
"""An entry read or claimed from a lane, with its delivery count."""


class Lane(msgspec.Struct):
    """One priority lane of the pool on one shard: its stream, where its errors are kept, its claimer."""

    index: int
    """Position in the worker's lanes (unique across shards): with the entry id, a running job's key."""
    priority: int
    """The class priority it carries, 0 the most urgent."""
    topo: Topology
    """Its shard's keys: every key of the lane's jobs (results, tokens, dead letters) comes from
    here, in each job's space (:meth:`keys`)."""
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

    def keys(self, routed: RoutedJob) -> Topology:
        """The keys of ``routed``'s space on this lane's shard: its done key, tokens and reply
        stream. ``ValueError`` for a space no tenant can have (no policy worker wrote it)."""
        return self.topo.of_tenant(routed.space)


def pool_lanes(scripts: Scripts, settings: Settings, pool: str, name: str, count: int, *,
               suspects: bool) -> list[Lane]:
    """The ``count`` priority lanes of ``pool`` on every shard, as worker ``name`` consumes them:
    most urgent first, each priority's shards in shard order (one shard: lane i is priority i).

    With ``suspects`` (the worker has sandboxes), the claimers tell apart entries whose last
    run only died with its worker (:mod:`broker.reclaim`): they read the lanes' error hashes.
    """
    lanes: list[Lane] = []
    for priority in range(count):
        for topo in settings.topology.every_shard:
            stream, errors = topo.pool(pool, priority), topo.errors(pool, priority)
            lanes.append(Lane(
                index=len(lanes), priority=priority, topo=topo, stream=stream, errors=errors,
                claimer=Claimer(scripts, stream, WORKER_GROUP, name, idle_ms=settings.claim_idle_ms,
                                interval_s=settings.claim_interval_s, error_prefix=errors if suspects else ""),
                completes=CompleteTarget(stream, WORKER_GROUP, name, topo, settings.result_ttl_s * 1000)))
    return lanes


class LaneReader:
    """Reads new entries (and its own pending ones after a restart) for a worker of ``concurrency`` slots.

    ``on_ready`` is called when a blocking read of a shard ends (several shards only): the
    worker collects what it brought with :meth:`ready` even while its slots are full.
    """

    def __init__(self, client: aioredis.Redis, lanes: list[Lane], name: str, *, concurrency: int,
                 shares: Sequence[float], block_ms: int, on_ready: Callable[[], object] = lambda: None) -> None:
        self.client = client
        self.lanes = lanes
        self.name = name
        self.block_ms = block_ms
        self.on_ready = on_ready
        by_priority: dict[int, list[Lane]] = collections.defaultdict(list)
        by_shard: dict[int, list[Lane]] = collections.defaultdict(list)
        for lane in lanes:
            by_priority[lane.priority].append(lane)
            by_shard[lane.topo.shard].append(lane)
        self.priorities = [by_priority[p] for p in sorted(by_priority)]
        """The lanes of each priority (one per shard), most urgent first."""
        self.shards = list(by_shard.values())
        """The lanes of each shard: what one blocking read may name (one slot)."""
        count = len(self.priorities)
        self.reserved = reserved_slots((*shares, *[0.0] * count)[:count], concurrency)
        """Slots each priority keeps for its own work (``PolicyConfig.lane_shares``, ``reserved_slots``)."""
        self._lane_of = {lane.stream.encode(): lane for lane in lanes}
        """Lanes by stream key, as XREADGROUP names them."""
        self._turn = 0
        """Which shard comes first within a priority on this read: the next one on the next."""
        self._waiting: dict[int, asyncio.Task[list[Taken]]] = {}
        """The blocking read in flight on each shard (several shards), by position in ``shards``."""
        self.stopping = False
        """Set by :meth:`cancel`: no new blocking read starts."""

    async def read(self, free: int, held: collections.Counter[int]) -> list[Taken]:
        """Up to ``free`` entries; blocks while every lane is empty. ``held``: the worker's jobs per priority.

        First each priority below the first up to its reserved slots (``reserved``, counting
        its jobs here), then most urgent priority first: more urgent work cannot starve a
        priority, and reserved slots that a priority leaves unused go to the others. With
        several shards, it may return more than ``free`` (see :meth:`_wait`).
        """
        # Not while reading our own pending entries (see Lane.cursor): once they are read, the
        # next call takes new ones lane by lane, in priority order, before any blocking read.
        history = any(lane.cursor != ">" for lane in self.lanes)
        got = self.ready()
        held = held + collections.Counter(lane.priority for lane, _entry, _deliveries in got)
        drained: set[int] = set()
        self._turn += 1
        for priority, lanes in enumerate(self.priorities[1:], start=1):
            for lane in self._in_turn(lanes):
                want = min(self.reserved[priority] - held[priority], free - len(got))
                if want <= 0:
                    break
                taken = await self._take(lane, want)
                if len(taken) < want:
                    drained.add(lane.index)
                held[priority] += len(taken)
                got += taken
        for lanes in self.priorities:
            for lane in self._in_turn(lanes):
                if len(got) >= free:
                    return got
                if lane.index not in drained:
                    got += await self._take(lane, free - len(got))
        if got or history or self.stopping or len(self.lanes) == 1:
            return got
        # Every lane of every shard is empty: wait for the first entry on any of them.
        if len(self.shards) == 1:
            return await self._wait(self.lanes)
        # One read per shard (a read may name one slot only), each kept in flight across calls
        # until it ends, at most one per shard: an entry on any shard wakes the worker within a
        # round trip, and a read that ends leaves the others waiting.
        for shard, lanes in enumerate(self.shards):
            if shard not in self._waiting:
                task = asyncio.create_task(self._wait(lanes))
                task.add_done_callback(lambda _task: self.on_ready())
                self._waiting[shard] = task
        await asyncio.wait(self._waiting.values(), return_when=asyncio.FIRST_COMPLETED)
        return self.ready()

    def ready(self) -> list[Taken]:
        """What the shards' blocking reads that ended since brought (no Redis call).

        A read that failed raises its error here, once, and only when no other read brought
        entries: those are returned first (they are ours now), and the error on the next call.
        """
        got: list[Taken] = []
        for shard, task in list(self._waiting.items()):
            if task.cancelled():  # at the stop
                del self._waiting[shard]
            elif task.done() and not (got and task.exception() is not None):
                del self._waiting[shard]
                got += task.result()
        # Reads that ended together: the most urgent entries start (and take the backend) first.
        return sorted(got, key=lambda taken: taken[0].priority)

    def cancel(self) -> None:
        """Cancel the blocking reads in flight (at the stop): the worker need not wait them out.

        Whatever a cancelled read took stays pending under our name: our claimer or a peer's
        takes it after the idle time, as after any read cut short.
        """
        self.stopping = True
        for task in self._waiting.values():
            task.cancel()

    async def close(self) -> None:
        """Cancel the blocking reads in flight and wait for them, :data:`STOP_TIMEOUT_S` at most."""
        self.cancel()
        tasks = list(self._waiting.values())
        self._waiting.clear()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        for task in tasks:  # retrieve the error of a read that failed before its cancel
            if task.done() and not task.cancelled():
                with contextlib.suppress(Exception):
                    task.result()

    def _in_turn(self, lanes: list[Lane]) -> list[Lane]:
        """``lanes`` (one priority's, one per shard) starting from this read's turn."""
        start = self._turn % len(lanes)
        return lanes[start:] + lanes[:start]

    async def _wait(self, lanes: list[Lane]) -> list[Taken]:
        """The first new entries on ``lanes`` (one shard's), waiting up to ``block_ms``.

        One entry per lane at most, so a wake-up takes no more than a lane's share of a
        peer's work (with several shards, one per lane of each shard whose read ends).
        """
        reply = await self.client.xreadgroup(WORKER_GROUP, self.name, {lane.stream: ">" for lane in lanes},
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
