"""A policy worker routes every shard's jobs within their shard, and sees the fleet over all shards.

Against a real Redis: a single node holding three shards, and a real three-primary Redis
Cluster whose shards live on different nodes. Producers here write jobs as any-language
producers do (XADD to the ingress of the job's shard, docs/wire-format.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from broker.config import load_config
from broker.connection import connect
from broker.policy_worker import PolicyWorker
from broker.settings import Settings
from broker.topology import POLICY_GROUP, shard_of
from broker.wire import Job, decode_routed, json_encode
from tests.helpers import eventually

SHARDS = 3


@pytest_asyncio.fixture(params=["node", "cluster"])
async def deployment(request: pytest.FixtureRequest, redis_url: str, prefix: str) -> AsyncIterator[Settings]:
    if request.param == "cluster":
        redis_url = request.getfixturevalue("redis_cluster").url
    yield Settings(redis_url=redis_url, prefix=prefix, shards=SHARDS, block_ms=200, snapshot_s=0.05,
                   heartbeat_s=0.2)


async def test_each_job_is_routed_into_its_own_shards_lane_and_the_snapshot_sums_the_shards(
        deployment: Settings) -> None:
    client = connect(deployment.redis_url or "")
    topo = deployment.topology
    policy = PolicyWorker(client, deployment, load_config())
    stop = asyncio.Event()
    jobs = [Job.chat("llama-3.1-8b", "hi", id=f"job-{i}", max_tokens=4, slo="standard") for i in range(30)]
    try:
        for job in jobs:
            await client.xadd(topo.of_job(job.id).jobs, {"job": json_encode(job)})
        assert len({shard_of(job.id, SHARDS) for job in jobs}) == SHARDS  # every shard has work
        running = asyncio.create_task(policy.run(stop))
        lanes = [t.pool("gpu", load_config().lane("standard")) for t in topo.every_shard]

        async def all_routed() -> bool:
            return sum([await client.xlen(lane) for lane in lanes]) == len(jobs)

        await eventually(all_routed, what="every job routed")
        for shard, lane in enumerate(lanes):
            routed = [decode_routed(fields[b"routed"]).job.id for _id, fields in await client.xrange(lane)]
            assert routed and all(shard_of(job_id, SHARDS) == shard for job_id in routed)
        for shard in topo.every_shard:  # ingress drained, and each shard's group made there
            assert await client.xlen(shard.jobs) == 0
            assert [g["name"] for g in await client.xinfo_groups(shard.jobs)] == [POLICY_GROUP.encode()]
        await policy.refresh()
        assert policy.snapshot.pools["gpu"].backlog == len(jobs)  # no worker: all wait, over 3 shards
        stop.set()
        await asyncio.wait_for(running, deployment.block_ms / 1000 + 5)
    finally:
        stop.set()
        await client.aclose()


async def test_a_policy_worker_dead_letters_a_bad_entry_on_the_shard_it_came_from(deployment: Settings) -> None:
    client: aioredis.Redis = connect(deployment.redis_url or "")
    topo = deployment.topology.at(2)
    policy = PolicyWorker(client, deployment, load_config())
    stop = asyncio.Event()
    try:
        await client.xadd(topo.jobs, {"job": b"{not json"})
        running = asyncio.create_task(policy.run(stop))

        async def dead() -> bool:
            return await client.xlen(topo.dead) == 1

        await eventually(dead, what="a dead letter on shard 2")
        assert [await client.xlen(t.dead) for t in deployment.topology.every_shard] == [0, 0, 1]
        stop.set()
        await asyncio.wait_for(running, deployment.block_ms / 1000 + 5)
    finally:
        stop.set()
        await client.aclose()
