"""The local Redis Cluster that tests and `--cluster` stacks stand on: real redis-server processes."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from cli.cluster import SLOTS, EmbeddedCluster, slot_ranges


@pytest.mark.parametrize("primaries", [1, 2, 3, 5, 16])
def test_slot_ranges_cover_every_slot_once_in_even_contiguous_ranges(primaries: int) -> None:
    ranges = slot_ranges(primaries)
    assert ranges[0][0] == 0 and ranges[-1][1] == SLOTS - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [last - first + 1 for first, last in ranges]
    assert max(sizes) - min(sizes) <= 1


def cluster_client(cluster: EmbeddedCluster) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes], decode_responses=True)


def test_three_primaries_form_a_cluster_that_spreads_keys_over_every_node() -> None:
    with EmbeddedCluster(primaries=3) as cluster:
        client = cluster_client(cluster)
        try:
            for i in range(60):
                client.set(f"{{shard.{i}}}:k", str(i))
            assert [client.get(f"{{shard.{i}}}:k") for i in range(60)] == [str(i) for i in range(60)]
        finally:
            client.close()
        sizes = []
        for node in cluster.nodes:
            with redis.Redis(port=node.port) as one:
                sizes.append(one.dbsize())
        assert sum(sizes) == 60 and all(size > 0 for size in sizes)


def test_killing_a_primary_promotes_its_replica_and_keeps_replicated_writes() -> None:
    with EmbeddedCluster(primaries=3, replicas=1) as cluster:
        assert len(cluster.primary_nodes()) == 3
        client = cluster_client(cluster)
        try:
            for i in range(30):
                client.set(f"{{shard.{i}}}:k", str(i))
            # Every primary's writes reach its replica before the kill (what WAIT promises).
            for node in cluster.primary_nodes():
                with redis.Redis(port=node.port) as one:
                    assert one.execute_command("WAIT", 1, 5000) == 1
            victim = cluster.primary_nodes()[0]
            victim.kill()
            deadline = time.monotonic() + 30
            while len(cluster.primary_nodes()) < 3:  # a replica takes the dead primary's slots
                assert time.monotonic() < deadline, "no replica was promoted in 30 s"
                time.sleep(0.1)
            survivor = cluster.primary_nodes()[0]
            with redis.Redis(port=survivor.port, decode_responses=True) as one:
                while not one.execute_command("CLUSTER", "INFO").startswith("cluster_state:ok"):
                    assert time.monotonic() < deadline, "the cluster did not serve every slot again"
                    time.sleep(0.1)
        finally:
            client.close()
        fresh = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", survivor.port)], decode_responses=True)
        try:
            assert [fresh.get(f"{{shard.{i}}}:k") for i in range(30)] == [str(i) for i in range(30)]
        finally:
            fresh.close()


async def test_scripts_run_through_a_cluster_pipeline_across_slots_and_survive_a_flushed_cache() -> None:
    # The broker's script runner on a cluster client: each call routed by its keys' slot,
    # NOSCRIPT (a node that lost its script cache) answered by loading and rerunning only those.
    from redis.asyncio.cluster import ClusterNode as AsyncNode
    from redis.asyncio.cluster import RedisCluster as AsyncCluster

    from broker import calls
    from broker.scripts import Scripts
    from broker.topology import Topology

    with EmbeddedCluster(primaries=3) as cluster:
        client = AsyncCluster(startup_nodes=[AsyncNode(h, p) for h, p in cluster.startup_nodes])
        try:
            scripts = Scripts(client)  # type: ignore[arg-type]
            topos = [Topology(f"s{i}") for i in range(6)]  # six hash tags over the three primaries
            for flushed in (False, True):
                if flushed:
                    await client.script_flush()  # every primary forgets every script
                pipe = client.pipeline()
                for topo in topos:
                    scripts.queue(pipe, calls.submit(topo.jobs, 100, [b'{"id":"a"}']))  # type: ignore[arg-type]
                pipe.incr("{s0}:counter")
                replies = await scripts.execute(pipe)  # type: ignore[arg-type]
                assert [len(ids) for ids, _backlog in replies[:-1]] == [1] * 6  # type: ignore[misc]
                assert replies[-1] == 1 + flushed  # the other command ran once each time
            assert [await client.xlen(topo.jobs) for topo in topos] == [2] * 6
        finally:
            await client.aclose()


async def test_the_policy_and_a_pool_worker_run_jobs_on_a_cluster_in_one_slot() -> None:
    # With one shard every key shares the tag {prefix}: the broker as it is, on a cluster client.
    from redis.asyncio.cluster import ClusterNode as AsyncNode
    from redis.asyncio.cluster import RedisCluster as AsyncCluster

    from broker.config import load_config
    from broker.policy_worker import PolicyWorker
    from broker.settings import Settings
    from broker.wire import Job, decode_result, json_encode
    from workers.factory import make_backend
    from workers.worker import PoolWorker

    with EmbeddedCluster(primaries=3) as cluster:
        def connect() -> AsyncCluster:
            return AsyncCluster(startup_nodes=[AsyncNode(h, p) for h, p in cluster.startup_nodes])

        config, settings = load_config(), Settings(redis_url="redis://unused", prefix="one")
        client, policy_client, worker_client = connect(), connect(), connect()
        stop = asyncio.Event()
        policy = PolicyWorker(policy_client, settings, config)  # type: ignore[arg-type]
        worker = PoolWorker(worker_client, settings, "gpu", make_backend(config.pools["gpu"]),  # type: ignore[arg-type]
                            concurrency=8, lanes=config.lanes, shares=config.lane_shares)
        roles = [asyncio.create_task(policy.run(stop)), asyncio.create_task(worker.run(stop))]
        try:
            for i in range(20):
                job = Job.chat("llama-3.1-8b", "hi", id=f"c{i}", max_tokens=4, slo="standard")
                await client.xadd(settings.topology.jobs, {"job": json_encode(job)})
            results, last = [], "0"
            async with asyncio.timeout(30):
                while len(results) < 20:
                    for _stream, entries in await client.xread({settings.topology.reply("results"): last},
                                                               block=1000):
                        results += [decode_result(fields[b"result"]) for _id, fields in entries]
                        last = entries[-1][0]
            assert sorted(r.id for r in results) == sorted(f"c{i}" for i in range(20))
            assert all(r.status == "ok" and r.pool == "gpu" for r in results)
        finally:
            stop.set()
            await asyncio.gather(*roles)
            for c in (client, policy_client, worker_client):
                await c.aclose()


async def test_placement_names_each_shards_slot_and_node_and_readiness_pings_every_primary() -> None:
    from broker.topology import Topology
    from cli.httpd import Readiness

    topo = Topology("ib", 3)
    with EmbeddedCluster(primaries=3) as cluster:
        client = cluster_client(cluster)
        try:
            slots = [client.cluster_keyslot(f"{{{shard.tag}}}") for shard in topo.every_shard]
            for shard in topo.every_shard:
                client.xgroup_create(shard.jobs, "policy", mkstream=True)
        finally:
            client.close()
        owner = {i: cluster.nodes[n].port for n, (first, last) in enumerate(slot_ranges(3))
                 for i, slot in enumerate(slots) if first <= slot <= last}
        assert cluster.placement(topo) == [(i, slots[i], owner[i]) for i in range(3)]
        assert len(set(owner.values())) == 3  # {ib.0}, {ib.1}, {ib.2}: one shard per node
        assert cluster.describe(topo)[2] == f"  shard 0 {{ib.0}} -> slot {slots[0]} -> node :{owner[0]}"

        readiness = Readiness(cluster.url, [(topo.jobs, "policy")])  # a group on shard 0's node only
        try:
            await readiness.probe()
            assert readiness.status() == (True, "ok")
            # Shard 2's node is gone: shard 0's group still answers, the PING to every primary does not.
            next(node for node in cluster.nodes if node.port == owner[2]).kill()
            await readiness.probe()
            ready, why = readiness.status()
            assert not ready and "Redis unreachable" in why, why
        finally:
            await readiness.aclose()
