"""The script batcher: calls made together run in one pipeline, each caller gets its own answer."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from broker.scripts import ScriptBatcher, Scripts
from broker.streams import ensure_group
from broker.topology import WORKER_GROUP, Topology


async def test_concurrent_calls_share_a_pipeline_and_get_their_own_results(
        client: aioredis.Redis, prefix: str) -> None:
    topo = Topology(prefix)
    stream = topo.pool("gpu")
    await ensure_group(client, stream, WORKER_GROUP)
    ids = [await client.xadd(stream, {"routed": b"x"}) for _ in range(20)]
    await client.xreadgroup(WORKER_GROUP, "w1", {stream: ">"}, count=20)
    batcher = ScriptBatcher(Scripts(client))

    def complete(entry_id: bytes, consumer: str) -> object:
        job = entry_id.decode()
        return batcher.call("complete", [stream, topo.done(job), topo.reply("results"), topo.replies],
                            [WORKER_GROUP, entry_id, consumer, b'{"id":"%s"}' % entry_id, 60_000, "results"])

    # Half by their owner, half by a consumer that does not own them (fenced: -1).
    codes = await asyncio.gather(*(complete(e, "w1" if i % 2 == 0 else "intruder") for i, e in enumerate(ids)))
    assert codes == [1 if i % 2 == 0 else -1 for i in range(20)]
    assert batcher.batches == 1  # one round trip for all twenty
    assert await client.xlen(topo.reply("results")) == 10
    assert (await client.xpending(stream, WORKER_GROUP))["pending"] == 10  # the fenced ones stay

    # A script error reaches its caller only; the others in the batch still get results.
    bad = batcher.call("complete", [stream], [WORKER_GROUP])  # too few keys: Redis refuses it
    good = complete(ids[1], "w1")
    results = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(results[0], aioredis.ResponseError) and results[1] == 1


async def test_a_lost_connection_fails_every_waiting_call(prefix: str) -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    dead = aioredis.Redis(port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))  # nothing listens there
    batcher = ScriptBatcher(Scripts(dead))
    calls = [batcher.call("renew", [Topology(prefix).pool("gpu")], [WORKER_GROUP, "w"]) for _ in range(3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, aioredis.ConnectionError) for r in results), results
    assert batcher.flusher is None  # ready for the next batch
    with pytest.raises(aioredis.ConnectionError):
        await batcher.call("renew", [Topology(prefix).pool("gpu")], [WORKER_GROUP, "w"])
    await dead.aclose()


async def test_renew_reports_only_entries_another_consumer_holds(client: aioredis.Redis, prefix: str) -> None:
    stream = Topology(prefix).pool("gpu")
    await ensure_group(client, stream, WORKER_GROUP)
    mine, taken, done = [await client.xadd(stream, {"routed": b"x"}) for _ in range(3)]
    await client.xreadgroup(WORKER_GROUP, "w1", {stream: ">"}, count=3)
    await client.xclaim(stream, WORKER_GROUP, "w2", 0, [taken])  # a peer took it over
    await client.xack(stream, WORKER_GROUP, done)  # completed while the renewal was on its way
    await asyncio.sleep(0.05)
    lost = await Scripts(client).call("renew", [stream], [WORKER_GROUP, "w1", mine, taken, done])
    assert lost == [taken]
    pending = {p["message_id"]: p for p in await client.xpending_range(stream, WORKER_GROUP, "-", "+", 10)}
    assert pending[mine]["time_since_delivered"] < 50  # renewed: idle back to ~0
    assert pending[mine]["times_delivered"] == 1  # without counting a delivery
