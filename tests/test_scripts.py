"""The script batcher: calls made together run in one pipeline, each caller gets its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest
import redis.asyncio as aioredis

from broker import calls
from broker.calls import CompleteTarget, Completion
from broker.script_batcher import ScriptBatcher
from broker.scripts import Scripts
from broker.streams import ensure_group
from broker.topology import WORKER_GROUP, Topology


async def pool_entries(client: aioredis.Redis, topo: Topology, n: int) -> tuple[str, list[bytes]]:
    """A pool stream with its workers' group and ``n`` new entries: the stream and their ids."""
    stream = topo.pool("gpu")
    await ensure_group(client, stream, WORKER_GROUP)
    return stream, [await client.xadd(stream, {"routed": b"x"}) for _ in range(n)]


async def test_concurrent_calls_share_a_pipeline_and_get_their_own_results(
        client: aioredis.Redis, prefix: str) -> None:
    topo = Topology(prefix)
    stream, ids = await pool_entries(client, topo, 20)
    await client.xreadgroup(WORKER_GROUP, "w1", {stream: ">"}, count=20)
    batcher = ScriptBatcher(Scripts(client))

    def complete(entry_id: bytes, consumer: str) -> Awaitable[int]:
        job = entry_id.decode()
        target = CompleteTarget(stream, WORKER_GROUP, consumer, topo, 60_000)
        return batcher.complete(target, Completion(entry_id, "", job, "results", b'{"id":"%s"}' % entry_id))

    # Half by their owner, half by a consumer that does not own them (fenced: -1); the last
    # one twice in the same batch (a duplicate: 0, acked once).
    completing = [complete(e, "w1" if i % 2 == 0 else "intruder") for i, e in enumerate(ids)]
    codes = await asyncio.gather(*completing, complete(ids[-2], "w1"))
    assert codes == [1 if i % 2 == 0 else -1 for i in range(20)] + [0]
    assert batcher.batches == 1  # one round trip for all of them
    assert await client.xlen(topo.reply("results")) == 10
    assert await client.smembers(topo.replies) == {b"results"}
    assert (await client.xpending(stream, WORKER_GROUP))["pending"] == 10  # the fenced ones stay
    assert await client.xlen(stream) == 10  # the completed ones are deleted

    # A script error reaches its callers only; the others in the batch still get results.
    await client.set(f"{prefix}:string", b"x")
    bad = batcher.call(calls.renew(f"{prefix}:string", WORKER_GROUP, "w1", [ids[1]]))  # WRONGTYPE: Redis refuses it
    good = complete(ids[1], "w1")
    results = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(results[0], aioredis.ResponseError) and results[1] == 1


async def test_complete_fences_each_entry_when_the_consumer_holds_many_more(
        client: aioredis.Redis, prefix: str) -> None:
    # COMPLETE reads what the consumer holds in one page of twice the batch; a worker holding
    # more (long jobs ending one at a time) must still get each entry's own answer.
    topo = Topology(prefix)
    stream, ids = await pool_entries(client, topo, 30)
    await client.xreadgroup(WORKER_GROUP, "w1", {stream: ">"}, count=20)  # w1 holds 20
    await client.xreadgroup(WORKER_GROUP, "w2", {stream: ">"}, count=10)  # w2 the other 10
    batcher = ScriptBatcher(Scripts(client))
    target = CompleteTarget(stream, WORKER_GROUP, "w1", topo, 60_000)
    ending = [ids[19], ids[3], ids[25], ids[11]]  # not in id order; ids[25] is w2's
    codes = await asyncio.gather(*(batcher.complete(target, Completion(e, "", e.decode(), "results", b"{}"))
                                   for e in ending))
    assert codes == [1, 1, -1, 1]
    assert (await client.xpending(stream, WORKER_GROUP))["pending"] == 30 - 3


async def test_complete_deletes_what_it_handled_and_keeps_pending_and_undelivered_entries(
        client: aioredis.Redis, prefix: str) -> None:
    # The stream is trimmed below its oldest pending entry, and handled entries above it are
    # deleted one by one: whatever the order, only handled entries may leave the stream.
    topo = Topology(prefix)
    stream, ids = await pool_entries(client, topo, 12)
    await client.xreadgroup(WORKER_GROUP, "w1", {stream: ">"}, count=3)  # ids 0-2
    await client.xreadgroup(WORKER_GROUP, "w2", {stream: ">"}, count=3)  # ids 3-5: a slow peer
    await client.xreadgroup(WORKER_GROUP, "w1", {stream: ">"}, count=3)  # ids 6-8; 9-11 undelivered
    batcher = ScriptBatcher(Scripts(client))
    w1 = CompleteTarget(stream, WORKER_GROUP, "w1", topo, 60_000)

    async def complete(target: CompleteTarget, *entries: bytes) -> None:
        await asyncio.gather(*(batcher.complete(target, Completion(e, "", e.decode(), "results", b"{}"))
                               for e in entries))

    async def left() -> list[bytes]:
        return [entry_id for entry_id, _ in await client.xrange(stream)]

    await complete(w1, ids[7], ids[1], ids[8])
    assert await left() == [ids[0], *ids[2:7], *ids[9:]]
    await complete(w1, ids[0], ids[2], ids[6])  # w2's 3-5 still pending: 0-2 go below them
    assert await left() == [*ids[3:6], *ids[9:]]
    await complete(CompleteTarget(stream, WORKER_GROUP, "w2", topo, 60_000), *ids[3:6])  # none pending
    assert await left() == ids[9:]
    assert (await client.xpending(stream, WORKER_GROUP))["pending"] == 0


async def test_a_lost_connection_fails_every_waiting_call(prefix: str) -> None:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    dead = aioredis.Redis(port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))  # nothing listens there
    batcher = ScriptBatcher(Scripts(dead))
    renew = calls.renew(Topology(prefix).pool("gpu"), WORKER_GROUP, "w", [])
    results = await asyncio.gather(*(batcher.call(renew) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, aioredis.ConnectionError) for r in results), results
    assert batcher.flusher is None  # ready for the next batch
    with pytest.raises(aioredis.ConnectionError):
        await batcher.call(renew)
    await dead.aclose()


async def test_renew_reports_only_entries_another_consumer_holds(client: aioredis.Redis, prefix: str) -> None:
    stream, (mine, taken, done) = await pool_entries(client, Topology(prefix), 3)
    await client.xreadgroup(WORKER_GROUP, "w1", {stream: ">"}, count=3)
    await client.xclaim(stream, WORKER_GROUP, "w2", 0, [taken])  # a peer took it over
    await client.xack(stream, WORKER_GROUP, done)  # completed while the renewal was on its way
    await asyncio.sleep(0.05)
    lost = await Scripts(client).call(calls.renew(stream, WORKER_GROUP, "w1", [mine, taken, done]))
    assert lost == [taken]
    pending = {p["message_id"]: p for p in await client.xpending_range(stream, WORKER_GROUP, "-", "+", 10)}
    assert pending[mine]["time_since_delivered"] < 50  # renewed: idle back to ~0
    assert pending[mine]["times_delivered"] == 1  # without counting a delivery


async def test_scripts_redis_forgot_are_loaded_and_only_they_run_again(client: aioredis.Redis, prefix: str) -> None:
    # A Redis restarted without its script cache refuses EVALSHA; the calls it refused run
    # again once the scripts are loaded, and the pipeline's other commands run once.
    scripts = Scripts(client)
    topo = Topology(prefix)
    await client.script_flush()
    pipe = client.pipeline(transaction=False)
    scripts.queue(pipe, calls.submit(topo.jobs, 100, [b'{"id":"a"}']))
    pipe.incr(f"{prefix}:counter")
    (ids, backlog), count = await scripts.execute(pipe)
    assert len(ids) == 1 and backlog == -1 and count == 1
    assert await client.xlen(topo.jobs) == 1 and await client.get(f"{prefix}:counter") == b"1"
    pipe = client.pipeline(transaction=False)
    scripts.queue(pipe, calls.renew(f"{prefix}:counter", WORKER_GROUP, "w1", [b"0-1"]))  # WRONGTYPE: refused
    with pytest.raises(aioredis.ResponseError):
        await scripts.execute(pipe)
