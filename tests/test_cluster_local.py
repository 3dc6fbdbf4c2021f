"""The local Redis Cluster that tests and `--cluster` stacks stand on: real redis-server processes."""

from __future__ import annotations

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
