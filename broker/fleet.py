"""The policy's view of the fleet: each pool's backlog by lane, its live workers and what they report.

One round trip reads every pool's lane streams on every shard (group lag + pending, the
work waiting on each lane, summed over the shards) and its heartbeat hash (live workers,
jobs in flight, slots, cooldowns; on shard 0). On a cluster the pipeline goes to each node
with the keys it holds. The
result is the :class:`~policies.Snapshot` the router decides with; the job timings the
workers report in their beats are fed to the router's estimates, once per beat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec
import redis.asyncio as aioredis

from broker.heartbeats import read_beats
from broker.metrics import POOL_WORKERS
from broker.streams import group_backlog
from broker.topology import WORKER_GROUP, Topology
from broker.wire import Heartbeat, decode_heartbeat
from policies import PoolState, Snapshot
from policies.router import Observation


class Fleet:
    """Reads the pools named in ``lanes``: each pool's lanes, most urgent first, each lane the
    streams of that lane on every shard."""

    def __init__(self, client: aioredis.Redis, topo: Topology, lanes: dict[str, list[list[str]]], live_s: float,
                 observe: Callable[[Observation], None]) -> None:
        """``live_s``: a worker counts while its last beat is younger (``Settings.live_s``)."""
        self.client = client
        self.topo = topo
        self.lanes = lanes
        self.live_s = live_s
        self.observe = observe
        self.seen: dict[bytes, int] = {}
        """The last heartbeat (seq) learnt from, of each worker with a heartbeat in Redis."""
        self._workers = {pool: POOL_WORKERS.labels(pool) for pool in lanes}

    async def read(self, now: float) -> Snapshot:
        """Every pool's state at ``now``, from one pipeline."""
        async with self.client.pipeline(transaction=False) as pipe:
            for name, lanes in self.lanes.items():
                for lane in lanes:
                    for stream in lane:
                        pipe.xinfo_groups(stream)
                        pipe.xlen(stream)
                pipe.hgetall(self.topo.heartbeats(name))
            replies = iter(await pipe.execute(raise_on_error=False))
        pools: dict[str, PoolState] = {}
        beating: set[bytes] = set()
        for name, lanes in self.lanes.items():
            waiting = [_sum(group_backlog(next(replies), next(replies), WORKER_GROUP) for _ in lane) for lane in lanes]
            beats = read_beats(next(replies), decode_heartbeat, self.topo.heartbeats(name))
            beating.update(beats)
            pools[name] = self._pool(name, waiting, beats, now)
        for gone in self.seen.keys() - beating:  # its heartbeat expired (see the janitor)
            del self.seen[gone]
        return Snapshot(now=now, pools=pools)

    def _pool(self, name: str, waiting: list[tuple[int, int]], beats: dict[bytes, Heartbeat], now: float) -> PoolState:
        queued = tuple(lag for lag, _ in waiting)
        workers = in_flight = capacity = 0
        cooling: list[float | None] = []
        for worker, beat in beats.items():
            if now - beat.ts < self.live_s:
                workers += 1
                in_flight += beat.in_flight
                capacity += beat.capacity
                until = beat.cooling_until
                cooling.append(until if until is not None and until > now else None)
            self._learn(name, worker, beat)
        # The pool is cooling only while every live worker is: then the first back ends it.
        untils = [u for u in cooling if u is not None]
        self._workers[name].set(workers)
        return PoolState(backlog=sum(queued) + sum(pending for _, pending in waiting), queued=queued,
                         workers=workers, in_flight=in_flight, capacity=capacity,
                         cooling_until=min(untils) if cooling and len(untils) == len(cooling) else None)

    def _learn(self, pool: str, worker: bytes, beat: Heartbeat) -> None:
        """Feed the router the job timings a worker reported, once per heartbeat."""
        if not beat.seq or self.seen.get(worker) == beat.seq:
            return
        self.seen[worker] = beat.seq
        for obs in beat.obs:
            self.observe(Observation(pool=pool, **msgspec.structs.asdict(obs)))


def _sum(backlogs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """A lane's (queued, pending) over its shards."""
    queued = pending = 0
    for lag, held in backlogs:
        queued += lag
        pending += held
    return queued, pending
