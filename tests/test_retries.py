"""Retries, dead letters after N deliveries, and leases, against real processes."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from broker.client import Client
from broker.topology import Topology
from broker.wire import Job, decode_dead
from tests.conftest import FAST_ENV, Roles


def completion(job_id: str, tokens: int = 4, model: str = "llama-3.1-8b", **metadata: str) -> Job:
    return Job(id=job_id, model=model, kind="completion", prompt="p", max_tokens=tokens, metadata=metadata)


async def test_failing_and_crashing_jobs_are_dead_lettered_while_healthy_ones_flow(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    roles.start("policy", env=FAST_ENV)
    workers = [roles.start("worker", "--pool", "gpu", env=FAST_ENV) for _ in range(2)]
    topo = Topology(prefix)
    healthy = [completion(f"ok-{i}") for i in range(100)]
    async with Client(redis_url, prefix=prefix) as sdk:
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
            failed = await client.get(topo.done("always-fails"))
            killed = await client.get(topo.done("kills"))
            assert loop.time() < deadline, "poison jobs never reached the dead-letter stream"
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*(sdk.result(j.id, timeout=30) for j in healthy))
    assert all(r.status == "ok" for r in results)
    letters = {d.job_id: d for d in (decode_dead(f[b"dead"]) for _i, f in await client.xrange(topo.dead))}
    assert set(letters) == {"always-fails", "kills"}
    assert letters["always-fails"].reason == "max_deliveries"
    assert "injected transient fault" in letters["always-fails"].error  # the last error is kept
    assert letters["kills"].reason == "max_deliveries"
    assert json.loads(failed)["status"] == "failed"
    # Each poison job was delivered exactly max_deliveries times before giving up.
    assert "delivered 3 times" in letters["always-fails"].error and "delivered 3 times" in letters["kills"].error


async def test_a_job_longer_than_the_idle_time_runs_once(roles: Roles, redis_url: str, prefix: str) -> None:
    roles.start("policy", env=FAST_ENV)
    roles.start("worker", "--pool", "gpu", env=FAST_ENV)
    roles.start("worker", "--pool", "gpu", env=FAST_ENV)
    # ~3 s on the simulated 70B model, three times the 1 s takeover idle time.
    job = completion("long", tokens=150, model="llama-3.3-70b")
    async with Client(redis_url, prefix=prefix) as sdk:
        result = await sdk.run(job, timeout=30)
        assert result.status == "ok" and result.timing is not None
        assert result.metrics is not None and result.metrics.inference_time_ms > 2000
        assert result.timing.attempt == 1  # the lease held: nobody took it over
        entries = await sdk.redis.xrange(sdk.topo.reply("results"))
        assert len(entries) == 1
