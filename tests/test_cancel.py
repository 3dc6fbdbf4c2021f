"""Cancelling a job that has not started, with real roles, on one node and on a 3-shard cluster.

A job starts when a pool worker takes its entry (docs/reliability.md, Cancellation): before,
``Client.cancel`` ends it as ``cancelled`` and it never runs; after, cancel returns False and
the job ends as it would have. Either way each job has exactly one result.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import redis.asyncio as aioredis

from broker.client import Client
from broker.config import default_config_text
from broker.topology import WORKER_GROUP, Topology
from broker.wire import Job, Result, decode_result
from tests.conftest import ROOT, Roles
from tests.deployments import ON_BOTH, streams, xlen_all, xrange_all
from tests.helpers import admitting_all, eventually

pytestmark = ON_BOTH


def quick(job_id: str) -> Job:
    return Job(id=job_id, model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=2)


async def results(client: aioredis.Redis, topo: Topology) -> dict[str, list[Result]]:
    """Every result on every shard's reply stream, by job id."""
    out: dict[str, list[Result]] = {}
    for _id, fields in await xrange_all(client, streams(topo, lambda t: t.reply("results"))):
        result = decode_result(fields[b"result"])
        out.setdefault(result.id, []).append(result)
    return out


def policy(roles: Roles, tmp_path: Path) -> None:
    """A policy worker that routes whatever the pools' state (no worker may be running yet)."""
    config = tmp_path / "policy.toml"
    config.write_text(admitting_all(default_config_text()))
    roles.start("policy", env={"IB_CONFIG": str(config)})


async def waiting_entry(client: aioredis.Redis, topo: Topology, job_id: str) -> tuple[str, str]:
    """The pool stream and entry id of a routed job, from its routed marker (``<lane> <entry id>``)."""
    shard = topo.of_job(job_id)
    marker = b""

    async def routed() -> bool:
        nonlocal marker
        marker = await client.get(shard.routed(job_id)) or b""
        return b" " in marker

    await eventually(routed, what=f"job {job_id} to be routed")
    lane, entry = marker.decode().split(" ")
    return f"{shard.base}:{lane}", entry


async def test_a_job_cancelled_before_routing_never_runs(roles: Roles, redis_url: str, prefix: str, shards: int,
                                                         topo: Topology, client: aioredis.Redis,
                                                         tmp_path: Path) -> None:
    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        await sdk.submit_many([quick("gone"), quick("kept")])
        assert await sdk.cancel(quick("gone")) is True  # no role runs yet: it waits on the ingress
        assert await sdk.cancel(quick("gone")) is False  # twice: it has its outcome
        policy(roles, tmp_path)
        roles.worker("gpu")
        assert (await sdk.result("kept", timeout=30)).status == "ok"
        gone = await sdk.result("gone", timeout=5)
    assert gone.status == "cancelled" and gone.error == "cancelled by its producer" and gone.model == "llama-3.1-8b"

    async def drained() -> bool:
        return await xlen_all(client, streams(topo, lambda t: t.jobs)) == 0

    await eventually(drained, what="the policy to ack both jobs")
    assert await client.get(topo.of_job("gone").routed("gone")) == b"1"  # ROUTE acked it, sent it nowhere
    assert {job_id: len(rs) for job_id, rs in (await results(client, topo)).items()} == {"gone": 1, "kept": 1}


async def test_a_job_cancelled_on_its_pool_stream_never_runs(roles: Roles, redis_url: str, prefix: str, shards: int,
                                                             topo: Topology, client: aioredis.Redis,
                                                             tmp_path: Path) -> None:
    policy(roles, tmp_path)  # no pool worker yet: routed jobs wait on their pool's stream
    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        await sdk.submit_many([quick("gone"), quick("kept")])
        stream, entry = await waiting_entry(client, topo, "gone")
        assert [e for e, _ in await client.xrange(stream, entry, entry)] == [entry.encode()]
        assert await sdk.cancel(quick("gone")) is True
        assert await client.xrange(stream, entry, entry) == []  # no worker will see it
        await waiting_entry(client, topo, "kept")
        roles.worker("gpu")
        assert (await sdk.result("kept", timeout=30)).status == "ok"
        assert (await sdk.result("gone", timeout=5)).status == "cancelled"
        assert await sdk.cancel(quick("gone")) is False and await sdk.cancel(quick("kept")) is False  # both ended
    assert {job_id: len(rs) for job_id, rs in (await results(client, topo)).items()} == {"gone": 1, "kept": 1}


async def test_a_running_job_is_not_cancelled_and_completes(roles: Roles, redis_url: str, prefix: str, shards: int,
                                                            topo: Topology, client: aioredis.Redis,
                                                            tmp_path: Path) -> None:
    policy(roles, tmp_path)
    roles.worker("gpu")
    # ~2 s on the simulated 70B model: still running when the cancel lands.
    job = Job(id="long", model="llama-3.3-70b", kind="completion", prompt="p", max_tokens=100)
    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        await sdk.submit(job)
        stream, entry = await waiting_entry(client, topo, job.id)

        async def taken() -> bool:
            return bool(await client.xpending_range(stream, WORKER_GROUP, entry, entry, 1))

        await eventually(taken, what="the worker to take the job")
        assert await sdk.cancel(job) is False
        result = await sdk.result(job.id, timeout=30)
    assert result.status == "ok" and result.usage.completion_tokens == 100
    assert {job_id: len(rs) for job_id, rs in (await results(client, topo)).items()} == {"long": 1}


async def test_a_job_cancelled_before_it_is_submitted_is_dropped_at_routing(
        roles: Roles, redis_url: str, prefix: str, shards: int, topo: Topology, client: aioredis.Redis,
        tmp_path: Path) -> None:
    policy(roles, tmp_path)
    roles.worker("gpu")
    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        assert await sdk.cancel(quick("early")) is True
        await sdk.submit_many([quick("early"), quick("after")])
        assert (await sdk.result("after", timeout=30)).status == "ok"

        async def drained() -> bool:
            return await xlen_all(client, streams(topo, lambda t: t.jobs)) == 0

        await eventually(drained, what="the policy to ack both jobs")
    assert await client.get(topo.of_job("early").routed("early")) == b"1"  # ROUTE acked it, sent it nowhere
    statuses = Counter((job_id, r.status) for job_id, rs in (await results(client, topo)).items() for r in rs)
    assert statuses == Counter({("early", "cancelled"): 1, ("after", "ok"): 1})


async def test_the_cancel_command_finds_waiting_jobs_by_id(roles: Roles, redis_url: str, prefix: str, shards: int,
                                                           topo: Topology, client: aioredis.Redis,
                                                           tmp_path: Path) -> None:
    def cancel(*ids: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", "cancel", *ids, *roles.options],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)

    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        await sdk.submit(quick("on-ingress"))
        done = cancel("on-ingress", "never-sent")
        assert done.returncode == 2, done.stderr
        assert done.stdout.splitlines() == [
            "job on-ingress: cancelled",
            "job never-sent: not cancelled: no such job is waiting (never submitted, or its result has expired)"]
        policy(roles, tmp_path)
        await sdk.submit(quick("on-lane"))
        await waiting_entry(client, topo, "on-lane")
        done = cancel("on-lane")
        assert (done.returncode, done.stdout) == (0, "job on-lane: cancelled\n"), done.stderr
        assert cancel("on-lane").stdout == "job on-lane: not cancelled: it has ended already (cancelled)\n"
        for job_id in ("on-ingress", "on-lane"):
            result = await sdk.result(job_id, timeout=5)
            assert (result.status, result.error, result.model) == ("cancelled", "cancelled by an operator",
                                                                   "llama-3.1-8b")
    assert {job_id: len(rs) for job_id, rs in (await results(client, topo)).items()} == {"on-ingress": 1, "on-lane": 1}
