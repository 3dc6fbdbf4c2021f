"""The policy worker: routes every shard's jobs with one view of the fleet, and keeps house.

It runs one :class:`~broker.routing.ShardRouter` per shard of the deployment (each reads its
shard's ingress and moves jobs into the same shard's pool lanes: no job crosses shards), and
they all decide with one :class:`~broker.decider.Decider`, fed by one
:class:`~broker.fleet.Fleet` snapshot that sums each pool's lanes over the shards and reads
the workers' heartbeats. Each policy worker also runs the janitor, sends a heartbeat and
keeps the tenants' ledger current (:mod:`broker.tenancy`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from broker.decider import Decider, make_router
from broker.fleet import Fleet
from broker.janitor import Janitor, warn_if_evicting
from broker.metrics import PolicyMetrics, export_streams
from broker.routing import Counts, ShardRouter
from broker.scripts import Scripts
from broker.settings import Settings
from broker.streams import STOP_TIMEOUT_S, briefly, consumer_name, every, until_stopped
from broker.tenancy import free_finished, live_policy_workers
from broker.topology import POLICY_GROUP, WORKER_GROUP
from broker.wire import PolicyHeartbeat, json_encode
from policies import PolicyConfig, Snapshot


class PolicyWorker:
    """One policy worker process. Run several for availability; they share each shard's group."""

    def __init__(self, client: aioredis.Redis, settings: Settings, config: PolicyConfig, *,
                 name: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.settings = settings
        self.config = config
        self.topo = settings.topology
        self.name = name or consumer_name("policy")
        self.clock = clock
        self.scripts = Scripts(client)
        self.decider = Decider(config, make_router(config), self.name, clock())
        self.metrics = PolicyMetrics()
        """Prometheus instruments (broker/metrics.py), cached per class and pool."""
        self.counts = Counts()
        self.routers = [ShardRouter(client, self.scripts, settings, config, topo.of_tenant(tenant), name=self.name,
                                    decider=self.decider, metrics=self.metrics, counts=self.counts, clock=clock)
                        for topo in self.topo.every_shard for tenant in ("", *config.tenants)]
        """One per shard and space (the default space's first), shard 0 first."""
        shards = [r for r in self.routers if not r.topo.tenant]
        # Each pool's lane i over every shard: the fleet sums a lane's backlog over the shards.
        lanes = {p: [[r.lanes[p][lane] for r in shards] for lane in range(config.lanes)] for p in config.pools}
        self.fleet = Fleet(client, self.topo, lanes, settings.live_s, lambda obs: self.decider.router.observe(obs))
        streams = {r.topo.jobs: (POLICY_GROUP, self.topo.policy_heartbeats) for r in self.routers}
        streams |= {s: (WORKER_GROUP, self.topo.heartbeats(p)) for r in shards for p, ss in r.lanes.items() for s in ss}
        self._gauged = [(s.topo, {r.topo.jobs: POLICY_GROUP for r in self.routers if r.topo.shard == s.topo.shard}
                         | {lane: WORKER_GROUP for lanes in s.lanes.values() for lane in lanes}) for s in shards]
        """Each shard's streams (every space's ingress, the pool lanes) and their groups, for the gauges."""
        self.janitor = Janitor(client, settings, streams)
        self._swept_at = self._beat_at = 0.0

    async def setup(self) -> None:
        """Load the scripts, and create every shard's ingress groups (each space's) and pool lane
        groups (at id 0) before reading."""
        await self.scripts.teach()
        for router in self.routers:
            await router.setup()

    async def run(self, stop: asyncio.Event) -> None:
        """Route jobs until ``stop`` is set. Entries being routed finish first.

        Returns within ``block_ms`` + 2 x :data:`STOP_TIMEOUT_S` of the stop whatever Redis
        does: a batch still on its way then stays pending, and is taken over like any other.
        """
        await self.setup()
        await self.janitor.start()
        await warn_if_evicting(self.client)
        refresher = asyncio.create_task(every(self.settings.snapshot_s, self._tick, "pool snapshot refresh", stop))
        try:
            await until_stopped(self._route(stop), stop, self.settings.block_ms / 1000 + STOP_TIMEOUT_S)
        finally:
            refresher.cancel()
            await briefly(self.client.hdel(self.topo.policy_heartbeats, self.name),  # type: ignore[arg-type]
                          "remove the heartbeat")

    async def _route(self, stop: asyncio.Event) -> None:
        """Every shard's routing loop; should one fail, the others stop with it."""
        loops = [asyncio.create_task(router.run(stop)) for router in self.routers]
        try:
            await asyncio.gather(*loops)
        finally:
            for loop in loops:
                loop.cancel()

    async def refresh(self) -> None:
        """Take a new snapshot of the pools (:class:`~broker.fleet.Fleet`)."""
        self.decider.use(await self.fleet.read(self.clock()))

    @property
    def snapshot(self) -> Snapshot:
        """The pools as the router sees them now."""
        return self.decider.snapshot

    async def export_gauges(self) -> None:
        """Set the stream gauges (backlog, pending, oldest pending age, dead letters) from Redis.

        Called just before each Prometheus scrape rather than on a timer: between scrapes
        nobody reads them.
        """
        await export_streams(self.client, self._gauged)

    async def _tick(self) -> None:
        """Every snapshot period: refresh the pools; less often, housekeeping and a heartbeat."""
        await self.refresh()
        await free_finished(self.client, self.topo, self.decider.ledger)
        if self.clock() - self._swept_at >= self.settings.janitor_s:
            self._swept_at = self.clock()
            if await self.janitor.sweep(self._swept_at):
                await self.setup()
        if self.clock() - self._beat_at >= self.settings.heartbeat_s:
            self._beat_at = self.clock()
            beat = PolicyHeartbeat(ts=self._beat_at, routed=self.counts.routed, dead=self.counts.dead)
            await self.client.hset(self.topo.policy_heartbeats, self.name, json_encode(beat))  # type: ignore[arg-type, misc]
            if self.config.tenants:
                peers = await live_policy_workers(self.client, self.topo, self._beat_at, self.settings.live_s)
                self.decider.ledger.reshare(1 / peers)
