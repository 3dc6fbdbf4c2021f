"""The SDK on a deployment of three shards: each job goes to its shard, results come from all.

Against a real single node holding three shards and a real three-primary Redis Cluster
(and one with a replica per primary, for submits that wait for a replica).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from broker.client import Client
from broker.config import load_config
from broker.connection import connect
from broker.errors import Backpressure, NotReplicated
from broker.policy_worker import PolicyWorker
from broker.settings import Settings
from broker.topology import shard_of
from broker.wire import Job, decode_job
from cli.cluster import EmbeddedCluster
from workers.backend import InferenceOutput, TokenSink
from workers.worker import PoolWorker

SHARDS = 3


class Echo:
    """A backend that answers at once."""

    name = "echo"

    async def run(self, job: Job, on_token: TokenSink | None = None) -> InferenceOutput:
        now = time.time()
        return InferenceOutput(first_token_at=now, finished_at=now, prompt_tokens=1, completion_tokens=1,
                               output=job.id)

    async def aclose(self) -> None:
        pass


@pytest_asyncio.fixture(params=["node", "cluster"])
async def deployment(request: pytest.FixtureRequest, redis_url: str, prefix: str) -> AsyncIterator[Settings]:
    if request.param == "cluster":
        redis_url = request.getfixturevalue("redis_cluster").url
    yield Settings(redis_url=redis_url, prefix=prefix, shards=SHARDS, block_ms=200, snapshot_s=0.05,
                   heartbeat_s=0.2, grace_s=2.0)


def jobs(n: int, tag: str) -> list[Job]:
    made = [Job.chat("llama-3.1-8b", "hi", id=f"{tag}-{i}", max_tokens=4, slo="standard") for i in range(n)]
    assert len({shard_of(job.id, SHARDS) for job in made}) == SHARDS  # every shard has some
    return made


async def ingress_ids(settings: Settings) -> list[list[str]]:
    """The job ids on each shard's ingress stream."""
    client = connect(settings.redis_url or "")
    try:
        return [[decode_job(fields[b"job"]).id for _id, fields in await client.xrange(topo.jobs)]
                for topo in settings.topology.every_shard]
    finally:
        await client.aclose()


async def test_jobs_go_to_their_shard_and_results_come_back_from_every_shard(deployment: Settings) -> None:
    url = deployment.redis_url or ""
    batch = jobs(30, "sdk")
    async with Client(url, prefix=deployment.prefix, shards=SHARDS) as sdk:
        assert await sdk.submit_many(batch, chunk=7) == [job.id for job in batch]
        on_ingress = await ingress_ids(deployment)
        for shard, ids in enumerate(on_ingress):
            assert ids == [job.id for job in batch if shard_of(job.id, SHARDS) == shard]  # in order
        config = load_config()
        stop = asyncio.Event()
        clients = [connect(url, deployment.block_ms) for _ in range(2)]
        roles = [asyncio.create_task(PolicyWorker(clients[0], deployment, config).run(stop)),
                 asyncio.create_task(PoolWorker(clients[1], deployment, "gpu", Echo(), concurrency=8,
                                                lanes=config.lanes, shares=config.lane_shares).run(stop))]
        try:
            results = await asyncio.gather(*(sdk.result(job.id, timeout=30) for job in batch))
            assert [(r.id, r.status, r.output) for r in results] == [(j.id, "ok", j.id) for j in batch]
            followed: list[str] = []
            async with asyncio.timeout(30):
                async for result in sdk.results("readers"):
                    followed.append(result.id)
                    if len(followed) == len(batch):
                        break
            assert sorted(followed) == sorted(job.id for job in batch)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*roles), 15)
            for client in clients:
                await client.aclose()


async def test_a_full_shard_refuses_its_jobs_while_the_others_take_theirs(deployment: Settings) -> None:
    batch = jobs(30, "full")
    async with Client(deployment.redis_url or "", prefix=deployment.prefix, shards=SHARDS, max_backlog=4) as sdk:
        with pytest.raises(Backpressure) as refused:
            await sdk.submit_many(batch)
    on_ingress = await ingress_ids(deployment)
    assert all(len(ids) == 4 for ids in on_ingress)
    went_in = {job_id for ids in on_ingress for job_id in ids}
    assert refused.value.accepted == [job.id for job in batch if job.id in went_in]  # in submission order


async def test_a_submit_that_no_replica_confirms_says_so_and_stops_after_the_chunk(deployment: Settings) -> None:
    # Neither the node nor this cluster has replicas: WAIT 1 counts none.
    batch = jobs(12, "unconfirmed")
    async with Client(deployment.redis_url or "", prefix=deployment.prefix, shards=SHARDS,
                      replicas=1, replicas_ms=50) as sdk:
        with pytest.raises(NotReplicated, match=r"^5 job\(s\) reached their primary but not 1 replica") as late:
            await sdk.submit_many(batch, chunk=5)
    first = [job.id for job in batch[:5]]
    assert late.value.accepted == first and sorted(late.value.unconfirmed) == sorted(first)
    assert sorted(job_id for ids in await ingress_ids(deployment) for job_id in ids) == sorted(first)


async def test_a_submit_waits_for_a_replica_of_each_shard() -> None:
    with EmbeddedCluster(primaries=3, replicas=1) as replicated:
        batch = jobs(12, "confirmed")
        async with Client(replicated.url, shards=SHARDS, replicas=1, replicas_ms=2000) as sdk:
            assert await sdk.submit_many(batch, chunk=5) == [job.id for job in batch]
