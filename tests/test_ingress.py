"""What producers without the SDK send: raw JSON, msgpack, FastStream envelopes, bad bytes.

Each entry goes on the ingress of its job's shard (docs/wire-format.md), so the tests
marked ON_BOTH hold on one node and on a 3-shard deployment over a 3-primary cluster.
"""

from __future__ import annotations

import json

import msgspec
import pytest
import redis.asyncio as aioredis
from faststream.redis import RedisBroker

from broker.client import Client
from broker.topology import Topology
from broker.wire import decode_dead, decode_result
from tests.conftest import Roles
from tests.deployments import ON_BOTH, streams, xlen_all, xrange_all
from tests.helpers import eventually


async def read_result(client: aioredis.Redis, topo: Topology, job_id: str, stream: str = "results") -> dict:
    """Wait for ``job_id``'s entry on a reply stream (of its shard), as a plain consumer would; its JSON."""
    found: dict = {}

    async def check() -> bool:
        for _id, fields in await client.xrange(topo.of_job(job_id).reply(stream)):
            data = json.loads(fields[b"result"])
            if data["id"] == job_id:
                found.update(data)
                return True
        return False

    await eventually(check, what=f"result of {job_id}")
    return found


@ON_BOTH
async def test_raw_json_xadd_comes_back_on_its_reply_stream(roles: Roles, client: aioredis.Redis,
                                                             topo: Topology) -> None:
    roles.policy()
    roles.worker("gpu")
    # Exactly what docs/wire-format.md tells a producer in any language to send.
    job = {"id": "raw-1", "model": "llama-3.1-8b", "kind": "completion", "prompt": "Hello",
           "max_tokens": 8, "reply_to": "my-service"}
    await client.xadd(topo.of_job("raw-1").jobs, {"job": json.dumps(job)})
    result = await read_result(client, topo, "raw-1", "my-service")
    assert result["status"] == "ok" and result["pool"] == "gpu"
    assert result["usage"]["completion_tokens"] == 8
    assert result["metrics"]["time_to_first_token_ms"] > 0
    # The same JSON is retrievable by job id.
    assert json.loads(await client.get(topo.of_job("raw-1").done("raw-1")))["id"] == "raw-1"


@ON_BOTH
async def test_msgpack_job_is_accepted(roles: Roles, client: aioredis.Redis, topo: Topology) -> None:
    roles.policy()
    roles.worker("gpu")
    job = {"id": "mp-1", "model": "minilm-l6", "kind": "embedding", "texts": ["a", "b"]}
    await client.xadd(topo.of_job("mp-1").jobs, {"job": msgspec.msgpack.encode(job)})
    result = await read_result(client, topo, "mp-1")
    assert result["status"] == "ok" and len(result["embeddings"]) == 2


async def test_faststream_publisher_can_submit_jobs(roles: Roles, redis_url: str, prefix: str,
                                                   client: aioredis.Redis) -> None:
    roles.policy()
    roles.worker("gpu")
    topo = Topology(prefix)
    broker = RedisBroker(redis_url)
    async with broker:
        await broker.start()
        await broker.publish({"id": "fs-1", "model": "llama-3.1-8b", "kind": "completion", "max_tokens": 4,
                              "prompt": "hi"}, stream=topo.jobs)
    result = await read_result(client, topo, "fs-1")
    assert result["status"] == "ok"


@ON_BOTH
async def test_jobs_submitted_before_any_role_starts_are_all_processed(roles: Roles, redis_url: str,
                                                                      prefix: str, shards: int) -> None:
    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        jobs = [msgspec.structs.replace(j, id=f"early-{i}") for i, j in enumerate(
            [*(await _chat_jobs(30))])]
        await sdk.submit_many(jobs)  # no group exists yet, no consumer runs
        roles.policy()
        roles.worker("gpu")
        roles.worker("accel")
        results = [await sdk.result(j.id, timeout=30) for j in jobs]
    assert [r.status for r in results] == ["ok"] * 30


async def _chat_jobs(n: int) -> list:
    from tests.helpers import mixed_jobs

    return mixed_jobs(n, seed=3)


@ON_BOTH
async def test_bad_entries_become_dead_letters_and_the_policy_keeps_going(
        roles: Roles, topo: Topology, client: aioredis.Redis) -> None:
    policy = roles.policy()
    roles.worker("gpu")
    # Each entry on the ingress of its id's shard; one with no readable id on shard 0's.
    bad = [
        ("", {"job": b"\x00\xffnot a job"}),                                       # garbage bytes
        ("bad-types", {"job": b'{"id": "bad-types", "model": 42}'}),                 # wrong type
        ("no-input", {"job": b'{"id": "no-input", "model": "llama-3.1-8b", "kind": "chat"}'}),  # no messages
        ("", {"something": b"else"}),                                              # no job field
        ("", {"job": b"{" + b" " * (1 << 20) + b"}"}),                             # over the size limit
    ]
    for job_id, fields in bad:
        await client.xadd(topo.of_job(job_id).jobs if job_id else topo.jobs, fields)
    await client.xadd(topo.of_job("unknown-model").jobs, {"job": json.dumps({
        "id": "unknown-model", "model": "gpt-9", "kind": "completion", "prompt": "x"})})
    await client.xadd(topo.of_job("good").jobs, {"job": json.dumps({
        "id": "good", "model": "llama-3.1-8b", "kind": "completion", "prompt": "x", "max_tokens": 2})})

    assert (await read_result(client, topo, "good"))["status"] == "ok"
    dead = streams(topo, lambda t: t.dead)

    async def all_dead() -> bool:  # a script's first use on a server can land its calls a read later
        return await xlen_all(client, dead) >= len(bad) + 1

    await eventually(all_dead, what="a dead letter for each bad entry")
    letters = [decode_dead(f[b"dead"]) for _id, f in await xrange_all(client, dead)]
    reasons = sorted(d.reason for d in letters)
    assert reasons == sorted(["decode_error", "invalid_job", "invalid_job", "decode_error", "too_large",
                              "unknown_model"])
    too_large = next(d for d in letters if d.reason == "too_large")
    assert "limit" in too_large.error
    unknown = await read_result(client, topo, "unknown-model")
    assert unknown["status"] == "failed" and "unknown_model" in unknown["error"]
    # A job whose id and reply stream survive validation gets a failed result too.
    no_input = await read_result(client, topo, "no-input")
    assert no_input["status"] == "failed" and "messages" in no_input["error"]
    # Everything was acked: nothing is left pending on any ingress group.
    for shard in topo.every_shard:
        if await client.exists(shard.jobs):
            assert [g["pending"] for g in await client.xinfo_groups(shard.jobs)] == [0]
    assert policy.poll() is None  # still running


@ON_BOTH
async def test_expired_job_gets_an_expired_result(roles: Roles, redis_url: str, prefix: str, shards: int) -> None:
    roles.policy()
    roles.worker("gpu")
    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        from broker.wire import Job

        job = Job(id="late", model="llama-3.1-8b", kind="completion", prompt="x", deadline=1.0)
        result = await sdk.run(job, timeout=20)
    assert result.status == "expired" and result.timing is None


@ON_BOTH
async def test_result_stream_through_a_consumer_group(roles: Roles, redis_url: str, prefix: str,
                                                     shards: int) -> None:
    from tests.helpers import mixed_jobs

    roles.policy()
    roles.worker("gpu")
    roles.worker("accel")
    jobs = mixed_jobs(20, seed=5, tag="grp")
    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        await sdk.submit_many(jobs)
        seen = []
        async for result in sdk.results("billing", "c1"):
            seen.append(result.id)
            if len(seen) == len(jobs):
                break
        assert sorted(seen) == sorted(j.id for j in jobs)
        # Acks go per read, after its loop bodies: leaving mid-read leaves that read pending,
        # and the same consumer gets exactly those again, nothing acked twice or lost.
        pending = 0
        for shard in sdk.topo.every_shard:
            groups = {g["name"]: g for g in await sdk.redis.xinfo_groups(shard.reply("results"))}
            pending += groups[b"billing"]["pending"]
        again: list[str] = []
        if pending:
            async for result in sdk.results("billing", "c1"):
                again.append(result.id)
                if len(again) == pending:
                    break
        assert set(again) <= set(seen) and len(again) == pending


def test_decode_result_of_done_key_roundtrip() -> None:
    raw = b'{"id":"x","status":"ok","model":"m","kind":"chat","tenant":"t"}'
    assert decode_result(raw).id == "x"


def test_sync_helpers_submit_and_wait(roles: Roles, redis_url: str, prefix: str) -> None:
    from broker import Job, run_job, submit_jobs

    roles.policy()
    roles.worker("gpu")
    ids = submit_jobs([Job(id=f"sync-{i}", model="minilm-l6", kind="embedding", texts=["t"]) for i in range(3)],
                      redis_url=redis_url, prefix=prefix)
    assert ids == ["sync-0", "sync-1", "sync-2"]
    result = run_job(Job(id="sync-run", model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=3),
                     redis_url=redis_url, prefix=prefix, timeout=30)
    assert result.status == "ok" and result.usage.completion_tokens == 3


async def test_result_timeout_is_a_clear_error(redis_url: str, prefix: str) -> None:
    from broker.errors import ResultTimeout

    async with Client(redis_url, prefix=prefix) as sdk:
        with pytest.raises(ResultTimeout, match="never-submitted"):
            await sdk.result("never-submitted", timeout=0.3)
