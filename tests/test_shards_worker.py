"""A pool worker serves its pool's lanes on every shard of a deployment, on one node and on a cluster.

Each job's entry sits on its own shard's lanes (:func:`broker.topology.shard_of` its id), and
its result, done key and acks stay on that shard. An idle worker keeps one blocking read in
flight per shard, so an entry on any shard wakes it at once; a stop cancels them. Real
redis-server processes (one node, or a local 3-primary cluster), real scripts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from redis.crc import key_slot

from broker.config import load_config
from broker.connection import connect
from broker.policy_worker import PolicyWorker
from broker.settings import Settings
from broker.streams import STOP_TIMEOUT_S
from broker.topology import WORKER_GROUP, Topology, shard_of
from broker.wire import Job, Route, RoutedJob, decode_result, json_encode
from cli.cluster import EmbeddedCluster, slot_ranges
from tests.deployments import ON_BOTH
from tests.helpers import eventually
from workers.backend import InferenceOutput, TokenSink
from workers.worker import PoolWorker

SHARDS = 3


class Recorder:
    """A backend that answers at once and remembers the order it ran jobs in."""

    name = "recorder"

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def run(self, job: Job, on_token: TokenSink | None = None) -> InferenceOutput:
        self.ran.append(job.id)
        now = time.time()
        return InferenceOutput(first_token_at=now, finished_at=now, prompt_tokens=1, completion_tokens=1, output="ok")

    async def aclose(self) -> None:
        pass


def ids_on(shard: int, n: int, tag: str) -> list[str]:
    """``n`` job ids that live on ``shard`` of :data:`SHARDS`."""
    ids: list[str] = []
    i = 0
    while len(ids) < n:
        if shard_of(f"{tag}-{i}", SHARDS) == shard:
            ids.append(f"{tag}-{i}")
        i += 1
    return ids


def routed(job_id: str) -> bytes:
    """A pool entry's ``routed`` field, as the policy writes it."""
    now = time.time()
    job = Job(id=job_id, model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=2)
    return json_encode(RoutedJob(job=job, created_at=now, route=Route(
        pool="gpu", slo="standard", reason="test", routed_at=now, ttft_target_ms=1000.0)))


async def enqueue(client: aioredis.Redis, topo: Topology, job_ids: Iterable[str], lane: int = 0) -> None:
    """Route ``job_ids`` onto lane ``lane`` of pool ``gpu``, each on its own shard (as ROUTE does)."""
    for job_id in job_ids:
        await client.xadd(topo.of_job(job_id).pool("gpu", lane), {"routed": routed(job_id)})


@asynccontextmanager
async def running(worker: PoolWorker) -> AsyncIterator[asyncio.Event]:
    """``worker`` running until the block ends; yields its stop event."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def results_on(client: aioredis.Redis, topo: Topology) -> list[str]:
    """Job ids of the results on ``topo``'s shard's default reply stream."""
    return [decode_result(fields[b"result"]).id for _id, fields in await client.xrange(topo.reply("results"))]


async def all_done(client: aioredis.Redis, settings: Settings, job_ids: list[str]) -> None:
    """Every job's one result is on its own shard's reply stream and done key, and no entry is pending."""
    topo = settings.topology

    async def finished() -> bool:
        return sum([len(await results_on(client, shard)) for shard in topo.every_shard]) >= len(job_ids)

    await eventually(finished, timeout=30, what="a result for every job")
    for shard in topo.every_shard:
        mine = sorted(j for j in job_ids if shard_of(j, SHARDS) == shard.shard)
        assert sorted(await results_on(client, shard)) == mine
        for job_id in mine:
            assert decode_result(await client.get(shard.done(job_id))).status == "ok"
        for lane in (0, 1):
            assert (await client.xpending(shard.pool("gpu", lane), WORKER_GROUP))["pending"] == 0


def blocked_reads(client: aioredis.Redis, name: str, count: int) -> Callable[[], Awaitable[bool]]:
    """Whether exactly ``count`` connections named ``name`` are blocked in XREADGROUP on the server."""
    async def check() -> bool:
        listed = await client.client_list()
        blocked: int = sum(c["name"] == name and c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in listed)
        return blocked == count
    return check


async def test_one_worker_completes_jobs_of_every_shard_and_wakes_for_any_shard(redis_url: str, prefix: str,
                                                                                client: aioredis.Redis) -> None:
    # block_ms long, so a wake-up well under it comes from the shard's own read in flight,
    # not from a read that ended and looked again.
    settings = Settings(redis_url=redis_url, prefix=prefix, shards=SHARDS, block_ms=5000, claim_idle_ms=10_000,
                        heartbeat_s=0.2, grace_s=2.0)
    topo = settings.topology
    jobs = [j for shard in range(SHARDS) for j in ids_on(shard, 4, f"s{shard}")]
    await enqueue(client, topo, jobs[::2], lane=0)
    await enqueue(client, topo, jobs[1::2], lane=1)
    name = f"w-{prefix}"
    worker_client = aioredis.Redis.from_url(redis_url, client_name=name)
    backend = Recorder()
    worker = PoolWorker(worker_client, settings, "gpu", backend, concurrency=4, lanes=2, name=name)
    try:
        async with running(worker):
            await all_done(client, settings, jobs)
            # Idle on every shard: one blocking read in flight per shard.
            await eventually(blocked_reads(client, name, SHARDS), timeout=10, what="a blocking read on each shard")
            (late,) = ids_on(2, 1, "late")
            started = time.monotonic()
            await enqueue(client, topo, [late], lane=1)
            await eventually(lambda: client.exists(topo.of_job(late).done(late)), timeout=10,
                             what="the result of the job on shard 2")
            assert time.monotonic() - started < settings.block_ms / 1000 / 5
        assert sorted(backend.ran) == sorted([*jobs, late])  # each job ran once
        assert (await results_on(client, topo.at(2))).count(late) == 1
        assert not worker.running
    finally:
        await worker_client.aclose()


async def test_the_most_urgent_lane_goes_first_whichever_shard_holds_it(redis_url: str, prefix: str,
                                                                       client: aioredis.Redis) -> None:
    # Mirrors test_priority: lane 1 work queued on shard 0, lane 0 work on shard 1; one slot.
    settings = Settings(redis_url=redis_url, prefix=prefix, shards=SHARDS, block_ms=200, heartbeat_s=0.2)
    topo = settings.topology
    later, urgent = ids_on(0, 3, "later"), ids_on(1, 3, "urgent")
    await enqueue(client, topo, later, lane=1)
    await enqueue(client, topo, urgent, lane=0)
    backend = Recorder()
    worker = PoolWorker(client, settings, "gpu", backend, concurrency=1, lanes=2)
    async with running(worker):
        await all_done(client, settings, [*later, *urgent])
    assert backend.ran == [*urgent, *later]


def owners(prefix: str) -> set[int]:
    """The primaries (by slot range) that the shards of ``prefix``'s deployment land on."""
    return {next(i for i, (first, last) in enumerate(slot_ranges(3)) if first <= key_slot(s.tag.encode()) <= last)
            for s in Topology(prefix, SHARDS).every_shard}


async def test_one_worker_serves_three_shards_on_a_three_primary_cluster(redis_cluster: EmbeddedCluster,
                                                                        prefix: str) -> None:
    # A prefix whose three shards' tags land on the three primaries: every read and script
    # of the worker goes to the node of its shard.
    spread = next(p for p in (f"{prefix}-{i}" for i in range(1000)) if owners(p) == {0, 1, 2})
    settings = Settings(redis_url=redis_cluster.url, prefix=spread, shards=SHARDS, block_ms=1000,
                        heartbeat_s=0.2, grace_s=2.0)
    topo = settings.topology
    client, worker_client = connect(settings.redis_url or "", settings.block_ms), connect(
        settings.redis_url or "", settings.block_ms)
    try:
        jobs = [j for shard in range(SHARDS) for j in ids_on(shard, 7, f"c{shard}")][:20]
        await enqueue(client, topo, jobs[::2], lane=0)
        await enqueue(client, topo, jobs[1::2], lane=1)
        worker = PoolWorker(worker_client, settings, "gpu", Recorder(), concurrency=4, lanes=2)
        async with running(worker):
            await all_done(client, settings, jobs)
            # A job that arrives while the worker waits on every shard's node.
            (late,) = ids_on(1, 1, "late")
            await enqueue(client, topo, [late])
            await eventually(lambda: client.exists(topo.of_job(late).done(late)), timeout=10,
                             what="the result of the job that arrived while idle")
    finally:
        await client.aclose()
        await worker_client.aclose()


@ON_BOTH
async def test_the_policy_and_one_pool_worker_run_every_shards_jobs(redis_url: str, prefix: str) -> None:
    # The whole hop: producers XADD each job to its shard's ingress (docs/wire-format.md), the
    # policy routes it into that shard's lane, the worker answers on that shard.
    config = load_config()
    settings = Settings(redis_url=redis_url, prefix=prefix, shards=SHARDS, block_ms=200, snapshot_s=0.05,
                        heartbeat_s=0.2, grace_s=2.0)
    topo = settings.topology
    client, policy_client, worker_client = (connect(redis_url, settings.block_ms) for _ in range(3))
    jobs = [Job.chat("llama-3.1-8b", "hi", id=f"e2e-{i}", max_tokens=4, slo="standard") for i in range(20)]
    assert len({shard_of(job.id, SHARDS) for job in jobs}) == SHARDS
    stop = asyncio.Event()
    roles = [asyncio.create_task(PolicyWorker(policy_client, settings, config).run(stop)),
             asyncio.create_task(PoolWorker(worker_client, settings, "gpu", Recorder(), concurrency=8,
                                            lanes=config.lanes, shares=config.lane_shares).run(stop))]
    try:
        for job in jobs:
            await client.xadd(topo.of_job(job.id).jobs, {"job": json_encode(job)})

        async def answered() -> bool:
            return sum([len(await results_on(client, shard)) for shard in topo.every_shard]) >= len(jobs)

        await eventually(answered, timeout=30, what="a result for every job")
        for shard in topo.every_shard:
            mine = sorted(job.id for job in jobs if shard_of(job.id, SHARDS) == shard.shard)
            assert sorted(await results_on(client, shard)) == mine
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*roles), 15)
        for c in (client, policy_client, worker_client):
            await c.aclose()


async def test_a_stop_cancels_the_reads_in_flight_on_every_shard(redis_url: str, prefix: str,
                                                                 client: aioredis.Redis) -> None:
    settings = Settings(redis_url=redis_url, prefix=prefix, shards=SHARDS, block_ms=5000, claim_idle_ms=10_000,
                        heartbeat_s=0.2, grace_s=2.0)
    name = f"w-{prefix}"
    worker_client = aioredis.Redis.from_url(redis_url, client_name=name)
    worker = PoolWorker(worker_client, settings, "gpu", Recorder(), concurrency=4, lanes=2, name=name)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await eventually(blocked_reads(client, name, SHARDS), timeout=10, what="a blocking read on each shard")
        stopped = time.monotonic()
        stop.set()
        # run() promises max(grace_s, block_ms + STOP_TIMEOUT_S) + STOP_TIMEOUT_S; with several
        # shards an idle worker does not wait its reads out: well under one block_ms.
        await asyncio.wait_for(task, max(settings.grace_s, settings.block_ms / 1000 + STOP_TIMEOUT_S) + STOP_TIMEOUT_S)
        assert time.monotonic() - stopped < settings.block_ms / 1000 / 2
        assert not worker.reader.ready()
        # Nothing of ours is left blocked on the server to take entries nobody would run.
        await eventually(blocked_reads(client, name, 0), timeout=STOP_TIMEOUT_S,
                         what="the worker's reads to leave the server")
    finally:
        stop.set()
        await asyncio.wait({task}, timeout=10)
        await worker_client.aclose()


class Slow(Recorder):
    """A backend whose every job takes ``seconds``; ``started`` lists the jobs it began."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.started: list[str] = []

    async def run(self, job: Job, on_token: TokenSink | None = None) -> InferenceOutput:
        self.started.append(job.id)
        await asyncio.sleep(self.seconds)  # the job's run time on the device
        return await super().run(job, on_token)


async def test_entries_that_reach_a_full_worker_on_other_shards_keep_their_leases(
        redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    # A worker of one slot runs a job of shard 0 when jobs arrive on shards 1 and 2: the reads
    # in flight there take them. Taken, they are its own (running, their leases renewed) until
    # they run, not left idle past claim_idle_ms for its claimer to take again (a delivery counted).
    settings = Settings(redis_url=redis_url, prefix=prefix, shards=SHARDS, block_ms=400, claim_idle_ms=600,
                        claim_interval_s=0.1, heartbeat_s=0.2, grace_s=5.0)
    topo = settings.topology
    name = f"w-{prefix}"
    worker_client = aioredis.Redis.from_url(redis_url, client_name=name)
    backend = Slow(1.0)
    worker = PoolWorker(worker_client, settings, "gpu", backend, concurrency=1, name=name)
    first, *others = [ids_on(shard, 1, f"held{shard}")[0] for shard in range(SHARDS)]
    try:
        async with running(worker):
            await eventually(blocked_reads(client, name, SHARDS), timeout=10, what="a blocking read on each shard")
            await enqueue(client, topo, [first])
            await eventually(lambda: _true(backend.started == [first]), timeout=10, what="the first job to start")
            await enqueue(client, topo, others)
            await eventually(lambda: _all_exist(client, [topo.of_job(j).done(j) for j in [first, *others]]),
                             timeout=10, what="every job's result")
        results = [decode_result(await client.get(topo.of_job(j).done(j))) for j in [first, *others]]
        assert [r.timing.attempt if r.timing else None for r in results] == [1, 1, 1]
        assert backend.ran == backend.started == [first, *others]  # each ran once
    finally:
        await worker_client.aclose()


async def _true(value: bool) -> bool:
    return value


async def _all_exist(client: aioredis.Redis, keys: list[str]) -> bool:
    return bool(await client.exists(*keys) == len(keys))
