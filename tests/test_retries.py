"""Retries, dead letters after N deliveries, and leases, against real processes."""

from __future__ import annotations

import asyncio
import json
import time

import redis.asyncio as aioredis

from broker.client import Client
from broker.settings import Settings
from broker.streams import ensure_group
from broker.topology import WORKER_GROUP, Topology
from broker.wire import Job, Route, RoutedJob, decode_dead, json_encode
from tests.conftest import FAST_ENV, Roles
from tests.deployments import ON_BOTH, streams, xrange_all
from tests.helpers import only_dead_letter
from workers.backend import BackendError, InferenceOutput, TokenSink


def completion(job_id: str, tokens: int = 4, model: str = "llama-3.1-8b", **metadata: str) -> Job:
    return Job(id=job_id, model=model, kind="completion", prompt="p", max_tokens=tokens, metadata=metadata)


@ON_BOTH
async def test_failing_and_crashing_jobs_are_dead_lettered_while_healthy_ones_flow(
        roles: Roles, redis_url: str, prefix: str, shards: int, topo: Topology, client: aioredis.Redis) -> None:
    roles.start("policy", env=FAST_ENV)
    workers = [roles.start("worker", "--pool", "gpu", env=FAST_ENV) for _ in range(2)]
    healthy = [completion(f"ok-{i}") for i in range(100)]
    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        await sdk.submit_many([completion("always-fails", fault="transient"), completion("kills", fault="crash"),
                               *healthy])
        # A crash takes its worker down: restart workers as a supervisor (compose, systemd) would.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        failed = killed = None
        while failed is None or killed is None:
            for i, w in enumerate(workers):
                if w.poll() is not None:
                    assert w.returncode == 70  # the injected crash, nothing else
                    workers[i] = roles.start("worker", "--pool", "gpu", env=FAST_ENV)
            failed = await client.get(topo.of_job("always-fails").done("always-fails"))
            killed = await client.get(topo.of_job("kills").done("kills"))
            assert loop.time() < deadline, "poison jobs never reached the dead-letter stream"
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*(sdk.result(j.id, timeout=30) for j in healthy))
    assert all(r.status == "ok" for r in results)
    letters = {d.job_id: d for d in (decode_dead(f[b"dead"])
                                     for _i, f in await xrange_all(client, streams(topo, lambda t: t.dead)))}
    assert set(letters) == {"always-fails", "kills"}
    assert letters["always-fails"].reason == "max_deliveries"
    assert "injected transient fault" in letters["always-fails"].error  # the last error is kept
    assert letters["kills"].reason == "max_deliveries"
    assert json.loads(failed)["status"] == "failed"
    # Each poison job was delivered exactly max_deliveries times before giving up.
    assert "delivered 3 times" in letters["always-fails"].error and "delivered 3 times" in letters["kills"].error


@ON_BOTH
async def test_a_job_longer_than_the_idle_time_runs_once(roles: Roles, redis_url: str, prefix: str,
                                                        shards: int) -> None:
    roles.start("policy", env=FAST_ENV)
    roles.start("worker", "--pool", "gpu", env=FAST_ENV)
    roles.start("worker", "--pool", "gpu", env=FAST_ENV)
    # ~3 s on the simulated 70B model, three times the 1 s takeover idle time.
    job = completion("long", tokens=150, model="llama-3.3-70b")
    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        result = await sdk.run(job, timeout=30)
        assert result.status == "ok" and result.timing is not None
        assert result.metrics is not None and result.metrics.inference_time_ms > 2000
        assert result.timing.attempt == 1  # the lease held: nobody took it over
        entries = await sdk.redis.xrange(sdk.topo.of_job(job.id).reply("results"))
        assert len(entries) == 1


class _FailingBackend:
    """Fails every run with a retryable error, and counts its runs."""

    name = "failing"

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, job: Job, on_token: TokenSink | None = None) -> InferenceOutput:
        self.runs += 1
        raise BackendError("boom", retryable=True)

    async def aclose(self) -> None:
        pass


async def test_a_job_taken_over_at_start_counts_only_the_deliveries_that_ran(
        redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    # A worker's first pass claimed the job (delivery 2), then re-read it among its own
    # pending entries (those of a restart under the same name): a read of history that Redis
    # counts as a delivery. The failed run was recorded as delivery 2 of 3, so the job looked
    # like one whose worker had died: "delivered 4 times" in test_retries' first test, and here
    # a dead letter after one run that blamed a dead worker instead of the backend's error.
    settings = Settings(redis_url=redis_url, prefix=prefix, block_ms=200, claim_idle_ms=1000, claim_interval_s=0.2,
                        max_deliveries=3, retry_backoff_ms=50, heartbeat_s=0.2)
    topo = settings.topology
    stream = topo.pool("gpu")
    routed = RoutedJob(job=completion("abandoned"), created_at=time.time(), route=Route(
        pool="gpu", slo="standard", reason="test", routed_at=time.time(), ttft_target_ms=1000.0))
    await ensure_group(client, stream, WORKER_GROUP)
    entry = await client.xadd(stream, {"routed": json_encode(routed)})
    # Delivered once to a worker that died with it, long enough ago to be taken over at once.
    await client.xreadgroup(WORKER_GROUP, "dead-peer", {stream: ">"}, count=1)
    await client.xclaim(stream, WORKER_GROUP, "dead-peer", 0, [entry], idle=5000, justid=True)
    backend = _FailingBackend()
    letter, _worker = await only_dead_letter(client, settings, backend)
    assert (letter.job_id, letter.reason, letter.delivery_count) == ("abandoned", "max_deliveries", 3)
    assert letter.error == "delivered 3 times without success; last error: BackendError: boom"
    assert backend.runs == 2  # deliveries 2 and 3; the first died with its worker
