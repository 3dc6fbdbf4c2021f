"""The two deployments the core suites run on, from the same tests.

``node``: the session's redis-server, one shard (today's key names). ``cluster``: the
session's local Redis Cluster of 3 primaries (``tests/conftest.py``), a deployment of 3
shards, one per primary, so jobs, results and dead letters spread over three nodes and
every role serves every shard.

A test or module marked :data:`ON_BOTH` runs once on each: the ``where`` fixture it
overrides decides ``redis_url``, ``shards``, ``topo``, ``settings``, ``client`` and
``roles``. Such a test reads a stream of the deployment on every shard (:func:`streams`)
and a job's own keys on its shard (``topo.of_job(job_id)``): no command takes keys of two
shards, as none of the broker's do.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from broker.topology import Topology

ON_BOTH = pytest.mark.parametrize("where", ["node", "cluster"])
"""Run on one redis-server and on a 3-primary cluster with 3 shards."""

Entry = tuple[bytes, dict[bytes, bytes]]


def streams(topo: Topology, name: Callable[[Topology], str]) -> list[str]:
    """The stream ``name`` gives on each shard, shard 0 first (e.g. ``lambda t: t.dead``)."""
    return [name(shard) for shard in topo.every_shard]


async def xrange_all(client: aioredis.Redis, keys: list[str]) -> list[Entry]:
    """Every entry of every stream in ``keys``, stream by stream."""
    return [entry for key in keys for entry in await client.xrange(key)]


async def xlen_all(client: aioredis.Redis, keys: list[str]) -> int:
    """Entries on the streams in ``keys``, together."""
    return sum([await client.xlen(key) for key in keys])
