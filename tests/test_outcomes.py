"""One visible outcome per job even when its ``reply_to`` names a key that is no stream.

Redis does not roll back a script that fails part way, so the scripts check the keys they
write to before their first write; a job whose reply stream is a key of another type ends
as a dead letter that says so. Real scripts, real policy and pool workers, real Redis.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis

from broker import calls
from broker.calls import CompleteTarget, Completion, FailedJob, RouteMove
from broker.client import Client
from broker.config import load_config
from broker.policy_worker import PolicyWorker
from broker.script_batcher import ScriptBatcher
from broker.scripts import Scripts
from broker.settings import Settings
from broker.streams import ensure_group
from broker.topology import POLICY_GROUP, WORKER_GROUP, Topology
from broker.wire import Job, Route, RoutedJob, decode_dead, json_encode
from tests.conftest import FAST_ENV, Roles
from tests.helpers import eventually, lanes, only_dead_letter
from workers.backend import InferenceOutput, TokenSink

NOT_A_STREAM = b"a string, not a stream"


def completion(job_id: str, **fields: object) -> Job:
    return Job(id=job_id, model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=2, **fields)  # type: ignore[arg-type]


async def taken_entries(client: aioredis.Redis, stream: str, n: int, consumer: str = "w1") -> list[bytes]:
    """``n`` new entries on ``stream``, delivered to ``consumer`` of the workers' group."""
    await ensure_group(client, stream, WORKER_GROUP)
    ids = [await client.xadd(stream, {"routed": b"x"}) for _ in range(n)]
    await client.xreadgroup(WORKER_GROUP, consumer, {stream: ">"}, count=n)
    return ids


async def pending(client: aioredis.Redis, stream: str, group: str) -> list[bytes]:
    return [p["message_id"] for p in await client.xpending_range(stream, group, "-", "+", 100)]


async def test_complete_writes_nothing_for_a_job_whose_reply_to_is_not_a_stream(
        client: aioredis.Redis, prefix: str) -> None:
    topo = Topology(prefix)
    stream = topo.pool("gpu")
    bad, good = await taken_entries(client, stream, 2)
    await client.set(topo.reply("taken"), NOT_A_STREAM)
    target = CompleteTarget(stream, WORKER_GROUP, "w1", topo, 60_000)
    batcher = ScriptBatcher(Scripts(client))
    codes = await asyncio.gather(batcher.complete(target, Completion(bad, "", "bad", "taken", b'{"id":"bad"}')),
                                 batcher.complete(target, Completion(good, "", "good", "results", b'{"id":"good"}')))
    assert codes == [b"string", 1]  # the other job of the batch is not held up
    assert await client.get(topo.done("bad")) is None  # nothing written for it...
    assert await client.get(topo.reply("taken")) == NOT_A_STREAM
    assert await pending(client, stream, WORKER_GROUP) == [bad]  # ...and its entry is still the caller's
    assert await client.get(topo.done("good")) == b'{"id":"good"}'
    assert await client.smembers(topo.replies) == {b"results"}


async def test_dead_letters_a_job_whose_reply_to_is_not_a_stream(client: aioredis.Redis, prefix: str) -> None:
    topo = Topology(prefix)
    stream = topo.pool("gpu")
    (entry,) = await taken_entries(client, stream, 1)
    await client.set(topo.reply("taken"), NOT_A_STREAM)
    failed = b'{"id":"j","status":"failed"}'
    dead = calls.dead(stream, WORKER_GROUP, entry, "w1", b"letter", topo, FailedJob("j", "taken", failed, 60_000))
    assert await Scripts(client).call(dead) == 1
    assert [f[b"dead"] for _, f in await client.xrange(topo.dead)] == [b"letter"]
    assert await client.get(topo.done("j")) == failed  # still found by id
    assert await client.get(topo.reply("taken")) == NOT_A_STREAM
    assert await pending(client, stream, WORKER_GROUP) == []
    assert not await client.exists(topo.replies)


async def test_scripts_write_nothing_when_a_key_of_their_own_has_another_type(
        client: aioredis.Redis, prefix: str) -> None:
    # Before the checks, ROUTE set the job's routed marker and then failed on the pool's XADD:
    # the redelivered entry found the marker and was only acked, and the job was lost.
    topo = Topology(prefix)
    scripts = Scripts(client)
    await ensure_group(client, topo.jobs, POLICY_GROUP)
    entry = await client.xadd(topo.jobs, {"job": b"{}"})
    await client.xreadgroup(POLICY_GROUP, "p1", {topo.jobs: ">"})
    await client.set(topo.pool("gpu"), NOT_A_STREAM)
    with pytest.raises(aioredis.ResponseError, match="WRONGTYPE") as refused:
        await scripts.call(calls.route(POLICY_GROUP, topo, 60_000,
                                       [RouteMove(entry, topo.pool("gpu"), "j", b"routed", "results")]))
    assert not await client.exists(topo.routed("j"))
    assert await pending(client, topo.jobs, POLICY_GROUP) == [entry]
    assert f"{topo.pool('gpu')} is a string, not a stream; nothing was written" in str(refused.value)

    # DEAD with the dead-letter stream in another type's place: no done key claimed.
    stream = topo.pool("accel")
    (job_entry,) = await taken_entries(client, stream, 1)
    await client.set(topo.dead, NOT_A_STREAM)
    with pytest.raises(aioredis.ResponseError, match="WRONGTYPE"):
        await scripts.call(calls.dead(stream, WORKER_GROUP, job_entry, "w1", b"letter", topo,
                                      FailedJob("k", "results", b"{}", 60_000)))
    assert not await client.exists(topo.done("k"), topo.reply("results"))
    assert await pending(client, stream, WORKER_GROUP) == [job_entry]

    # REPLAY onto an ingress of another type: the dead letter is kept.
    await client.delete(topo.dead, topo.jobs)
    dead_id = await client.xadd(topo.dead, {"dead": b"letter"})
    await client.set(topo.jobs, NOT_A_STREAM)
    with pytest.raises(aioredis.ResponseError, match="WRONGTYPE"):
        await scripts.call(calls.replay(topo, dead_id.decode(), "k", b"{}"))
    assert await client.xlen(topo.dead) == 1


async def test_the_policy_dead_letters_jobs_whose_reply_to_is_not_a_stream_and_keeps_routing(
        redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    # Before the checks, the policy's COMPLETE (expired job) and DEAD (unknown model) failed
    # half way on the reply stream and the error stopped the policy worker; ROUTE sent the
    # job on to a pool, where its result was lost.
    settings = Settings(redis_url=redis_url, prefix=prefix)
    topo = settings.topology
    policy = PolicyWorker(client, settings, load_config())
    await policy.setup()
    await client.set(topo.reply("taken"), NOT_A_STREAM)
    jobs = [completion("routed", reply_to="taken"), completion("late", reply_to="taken", deadline=time.time() - 1),
            Job(id="odd", model="no-such-model", kind="completion", prompt="p", reply_to="taken"),
            completion("fine")]
    async with Client(redis_url, prefix=prefix) as sdk:
        await sdk.submit_many(jobs)
    reply = await client.xreadgroup(POLICY_GROUP, policy.name, {topo.jobs: ">"}, count=10)
    await policy.routers[0].handle([(entry, 1) for entry in reply[0][1]])

    letters = {d.job_id: d for d in (decode_dead(f[b"dead"]) for _, f in await client.xrange(topo.dead))}
    assert set(letters) == {"routed", "late", "odd"}
    for job_id in ("routed", "late"):
        assert letters[job_id].reason == "invalid_job"
        assert f"names key {topo.reply('taken')}, which is a string, not a stream" in letters[job_id].error
    assert letters["odd"].reason == "unknown_model"
    for job_id in ("routed", "late", "odd"):  # the failed result is still found by id
        assert json.loads(await client.get(topo.done(job_id)))["status"] == "failed"
    routed = [json.loads(f[b"routed"])["job"]["id"] for s in lanes(topo, "gpu") + lanes(topo, "accel")
              for _, f in await client.xrange(s)]
    assert routed == ["fine"]
    assert await pending(client, topo.jobs, POLICY_GROUP) == []
    assert await client.get(topo.reply("taken")) == NOT_A_STREAM


async def test_a_reply_to_that_stops_being_a_stream_after_routing_ends_in_one_dead_letter(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    # The case: COMPLETE set the done key, its XADD then failed, and the takeover
    # found the done key and only acked. The producer never saw an outcome.
    roles.start("policy", env=FAST_ENV)
    topo = Topology(prefix)
    async with Client(redis_url, prefix=prefix) as sdk:
        await sdk.submit(completion("turned", reply_to="answers"))
    pools = {pool: lanes(topo, pool) for pool in ("gpu", "accel")}

    async def routed_to() -> str | None:
        for pool, streams in pools.items():
            for stream in streams:
                if await client.xlen(stream):
                    return pool
        return None

    async def on_a_pool() -> bool:
        return await routed_to() is not None

    await eventually(on_a_pool, what="the job on a pool stream")
    pool = await routed_to()
    assert pool is not None
    await client.set(topo.reply("answers"), NOT_A_STREAM)  # after routing, before the run
    worker = roles.worker(pool)

    async def settled() -> bool:
        held = [await pending(client, stream, WORKER_GROUP) for stream in pools[pool]]
        return bool(await client.xlen(topo.dead)) and not any(held)

    await eventually(settled, what="a dead letter, and nothing left pending")
    letters = [decode_dead(f[b"dead"]) for _, f in await client.xrange(topo.dead)]
    assert [(d.job_id, d.reason) for d in letters] == [("turned", "invalid_job")]
    assert f"names key {topo.reply('answers')}, which is a string" in letters[0].error
    done = json.loads(await client.get(topo.done("turned")))
    assert done["status"] == "failed" and "not a stream" in done["error"]
    assert [await client.xlen(stream) for stream in pools[pool]] == [0] * len(pools[pool])  # nothing to run again
    assert worker.poll() is None


class _BuggyBackend:
    """A backend with a bug the worker does not foresee: what it returns is no output."""

    name = "buggy"

    async def run(self, job: Job, on_token: TokenSink | None = None) -> InferenceOutput:
        return None  # type: ignore[return-value]

    async def aclose(self) -> None:
        pass


async def test_a_job_task_that_fails_is_logged_and_retried_and_dead_letters_with_its_error(
        redis_url: str, prefix: str, client: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    # The task's exception was never retrieved (only asyncio's "never retrieved" message
    # showed it); the job waited out its lease, ran alone as a suspect, and its dead letter
    # said its worker had died.
    settings = Settings(redis_url=redis_url, prefix=prefix, block_ms=200, claim_idle_ms=1000, claim_interval_s=0.2,
                        max_deliveries=3, retry_backoff_ms=50, heartbeat_s=0.2)
    topo = settings.topology
    job = completion("buggy")
    routed = RoutedJob(job=job, created_at=time.time(), route=Route(
        pool="gpu", slo="standard", reason="test", routed_at=time.time(), ttft_target_ms=1000.0))
    await ensure_group(client, topo.pool("gpu"), WORKER_GROUP)
    await client.xadd(topo.pool("gpu"), {"routed": json_encode(routed)})
    letter, worker = await only_dead_letter(client, settings, _BuggyBackend())
    assert (letter.job_id, letter.reason) == ("buggy", "max_deliveries")
    assert "AttributeError in the worker" in letter.error  # the error itself, not "its worker died"
    failures = [r for r in caplog.records
                if r.name == "inference_broker.worker" and "failed in the worker" in r.getMessage()]
    assert len(failures) == 3 and all(getattr(r, "job_id", None) == "buggy" and r.exc_info for r in failures)
    assert not worker.running and worker.busy == 0  # no slot leaked
    assert await pending(client, topo.pool("gpu"), WORKER_GROUP) == []
