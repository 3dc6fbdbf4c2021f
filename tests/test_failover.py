"""Failover on a real Redis Cluster: a primary SIGKILLed under load, its replica promoted.

Three primaries with one replica each, a deployment of three shards, the policy worker and
two gpu pool workers as real processes, a producer submitting throughout. Mid-load one
primary is SIGKILLed; its replica takes over its slots; the killed node is started again
and rejoins as a replica (as an operator would bring it back).

Replication is asynchronous: a job its primary acknowledged and had not yet passed to the
replica is gone after the failover. docs/reliability.md says which writes can be lost;
this test counts them and checks that they are only the killed node's, and that with
``submit_replicas = 1`` (WAIT) none is.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from broker.client import Client
from broker.connection import RETRYABLE, connect
from broker.errors import NotReplicated
from broker.topology import POLICY_GROUP, WORKER_GROUP, Topology
from broker.wire import Job, decode_result
from cli.cluster import EmbeddedCluster, slot_ranges
from tests.conftest import FAST_ENV, Roles
from tests.helpers import eventually, lanes

SHARDS = 3
ENV = {**FAST_ENV, "IB_SHARDS": str(SHARDS)}


def jobs(n: int, tag: str) -> list[Job]:
    return [Job(id=f"{tag}-{i}", model="llama-3.1-8b", kind="completion", prompt="p" * 100, max_tokens=2)
            for i in range(n)]


def shards_of_node(topo: Topology, index: int, primaries: int) -> set[int]:
    """The shards whose tag lies in the slots primary ``index`` was given when the cluster formed."""
    first, last = slot_ranges(primaries)[index]
    return {t.shard for t in topo.every_shard if first <= key_slot(t.jobs.encode()) <= last}


async def outcomes(client: aioredis.Redis, topo: Topology) -> tuple[Counter[str], set[str]]:
    """(result entries per job id on every shard's reply stream, ids with a done key)."""
    entries: Counter[str] = Counter()
    for shard in topo.every_shard:
        for _id, fields in await client.xrange(shard.reply("results")):
            entries[decode_result(fields[b"result"]).id] += 1
    done = {job_id for job_id in entries if await client.exists(topo.of_job(job_id).done(job_id))}
    return entries, done


async def quiet(client: aioredis.Redis, topo: Topology) -> bool:
    """Nothing left to do on any shard: ingress and lanes empty, nothing pending."""
    for shard in topo.every_shard:
        for stream, group in ((shard.jobs, POLICY_GROUP), *((s, WORKER_GROUP) for s in lanes(shard, "gpu"))):
            if await client.xlen(stream):
                return False
            if await client.exists(stream) and (await client.xpending(stream, group))["pending"]:
                return False
    return True


@pytest.mark.parametrize("submit_replicas", [0, 1])
async def test_a_primary_sigkilled_under_load_fails_over_and_loses_only_what_the_docs_allow(
        make_roles: Callable[[str], Roles], prefix: str, submit_replicas: int) -> None:
    with EmbeddedCluster(primaries=3, replicas=1, node_timeout_ms=1000) as cluster:
        host, port = cluster.startup_nodes[0]
        url = f"redis+cluster://{host}:{port}"
        topo = Topology(prefix, SHARDS)
        victim = next(i for i in range(3) if shards_of_node(topo, i, 3))
        killed_shards = shards_of_node(topo, victim, 3)
        client = connect(url)
        roles = make_roles(url)
        procs = [roles.start("policy", env=ENV),
                 *(roles.start("worker", "--pool", "gpu", "--grace", "5", env=ENV) for _ in range(2))]
        try:
            async def up() -> bool:
                assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
                return (await client.hlen(topo.policy_heartbeats) >= 1  # type: ignore[misc]
                        and await client.hlen(topo.heartbeats("gpu")) >= 2)  # type: ignore[misc]

            await eventually(up, timeout=30, what="the roles to start")
            work = jobs(900, f"fo{submit_replicas}")
            acked: list[str] = []  # ids whose submit returned: the cluster acknowledged them
            halfway = asyncio.Event()
            refused: Counter[str] = Counter()

            async def produce() -> None:
                async with Client(url, prefix=prefix, shards=SHARDS, replicas=submit_replicas,
                                  replicas_ms=500) as sdk:
                    for start in range(0, len(work), 10):
                        chunk = work[start:start + 10]
                        deadline = time.monotonic() + 60
                        while True:
                            try:
                                await sdk.submit_many(chunk)
                                break
                            except (NotReplicated, *RETRYABLE) as exc:  # resubmitting the same ids is safe
                                refused[type(exc).__name__] += 1
                                assert time.monotonic() < deadline, f"the cluster did not come back: {exc}"
                                await asyncio.sleep(0.05)
                        acked.extend(j.id for j in chunk)
                        if len(acked) >= len(work) // 3:
                            halfway.set()
                        await asyncio.sleep(0.01)  # pacing: keep the load on across the failover

            async def fail_over() -> float:
                await halfway.wait()
                node = cluster.nodes[victim]
                replica = cluster.nodes[3 + victim]  # replicas follow primaries in order
                node.kill()
                killed_at = time.monotonic()
                await eventually(lambda: asyncio.to_thread(lambda: replica in cluster.primary_nodes()),
                                 timeout=30, what="the replica to be promoted")
                took = time.monotonic() - killed_at
                await asyncio.to_thread(node.start)  # back as a replica of the promoted node
                return took

            _, promoted_after = await asyncio.gather(produce(), fail_over())
            assert len(acked) == len(work)
            await eventually(lambda: quiet(client, topo), timeout=60, what="every shard to drain")
            entries, done = await outcomes(client, topo)
            lost = [job_id for job_id in acked if job_id not in done]
            duplicated = [job_id for job_id, n in entries.items() if n > 1]
            dead = sum([await client.xlen(shard.dead) for shard in topo.every_shard])
            print(f"\nsubmit_replicas={submit_replicas}: promoted after {promoted_after:.1f} s; "
                  f"{len(acked)} acknowledged, {len(lost)} lost, {len(duplicated)} with a second result "
                  f"entry, {dead} dead letters; submits refused during the failover: {dict(refused)}")
            assert dead == 0
            assert {topo.of_job(job_id).shard for job_id in lost + duplicated} <= killed_shards
            if submit_replicas:
                assert lost == []
            assert all(p.poll() is None for p in procs), "a role died in the failover"
        finally:
            await client.aclose()
