"""Tenants' quotas live: a tenant flooding at 10x its quota does not push another's attainment down.

A real policy worker and pool worker (separate processes), a policy file with two tenants,
and the SDK in each tenant's space. Two phases under the same roles and config: acme alone,
then acme again beside bulk sending ten times its jobs-per-second quota of long jobs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis.asyncio as aioredis

from broker.client import Client
from broker.topology import Topology
from broker.wire import Job, Result
from cli.stack import wait_for_roles
from tests.conftest import FAST_ENV, Roles
from tests.helpers import policy_refreshed_after

# Admission by prediction off (best_effort): every refusal here is the tenants' own. One GPU
# worker of 32 slots: bulk's admitted load (its quota, about 11 of 2 s jobs running) leaves
# acme room; ten times that would queue every job behind a full pool.
CONFIG = '''
default_class = "interactive"
default_pool = "gpu"

[classes.interactive]
ttft_ms = 500
on_unattainable = "best_effort"

[pools.gpu]
models = ["llama-3.1-8b"]
concurrency = 32

[tenants.acme]
jobs_per_s = 50

[tenants.bulk]
jobs_per_s = 5
burst_s = 1
'''
QUIET_RATE, QUIET_JOBS = 20.0, 40
"""acme: short chats at 20 jobs/s (40% of its quota) for 2 s."""
BULK_QUOTA, FLOOD = 5.0, 10.0
SECONDS = QUIET_JOBS / QUIET_RATE


async def paced(sdk: Client, jobs: list[Job], rate: float) -> None:
    """Submit ``jobs`` at ``rate`` per second on a fixed schedule (open loop, as producers do)."""
    start = time.monotonic()
    for i, job in enumerate(jobs):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        await sdk.submit(job)


def quiet(phase: str) -> list[Job]:
    return [Job.chat("llama-3.1-8b", "hello " * 20, id=f"{phase}-{i}", max_tokens=8) for i in range(QUIET_JOBS)]


def attainment(results: list[Result]) -> float:
    return sum(bool(r.slo_met) for r in results) / len(results)


async def test_a_tenant_at_ten_times_its_quota_leaves_the_others_attainment_alone(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis, tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(CONFIG)
    env = {**FAST_ENV, "IB_CONFIG": str(config)}
    roles.start("policy", env=env)
    roles.worker("gpu")
    topo = Topology(prefix)
    await asyncio.to_thread(wait_for_roles, redis_url, topo, {"gpu": 1})
    await policy_refreshed_after(client, topo, time.time(), "a policy heartbeat after the worker's first")
    flood = [Job.chat("llama-3.1-8b", "report " * 50, id=f"bulk-{i}", max_tokens=400)
             for i in range(int(BULK_QUOTA * FLOOD * SECONDS))]
    async with (Client(redis_url, prefix=prefix, tenant="acme") as acme,
                Client(redis_url, prefix=prefix, tenant="bulk") as bulk):
        await paced(acme, quiet("alone"), QUIET_RATE)
        alone = await asyncio.gather(*(acme.result(j.id, timeout=30) for j in quiet("alone")))
        # The same again, with bulk offering 10x its jobs/s quota of 2 s jobs at the same time.
        await asyncio.gather(paced(acme, quiet("beside"), QUIET_RATE), paced(bulk, flood, BULK_QUOTA * FLOOD))
        beside = await asyncio.gather(*(acme.result(j.id, timeout=30) for j in quiet("beside")))
        flooded = await asyncio.gather(*(bulk.result(j.id, timeout=30) for j in flood))
    assert all(r.status == "ok" and r.tenant == "acme" for r in alone + beside), \
        [(r.status, r.error) for r in alone + beside if r.status != "ok"]
    assert attainment(alone) >= 0.95, [r.timing for r in alone if not r.slo_met]
    assert attainment(beside) >= attainment(alone) - 0.03, (attainment(alone), attainment(beside))

    refused = [r for r in flooded if r.status == "rejected"]
    admitted = [r for r in flooded if r.status == "ok"]
    assert len(refused) + len(admitted) == len(flood)
    # Held to its quota: the bucket's depth (1 s) plus its rate over the flood's 2 s, and a
    # little for the flood taking longer to submit than planned.
    assert BULK_QUOTA <= len(admitted) <= BULK_QUOTA * (1 + SECONDS) + 3, len(admitted)
    for r in refused:  # refused at once, in bulk's own space, saying why and when to come back
        assert r.tenant == "bulk" and r.timing is None and r.pool is None
        assert r.error is not None and r.error.startswith("quota: tenant bulk over 5 jobs/s"), r.error
        assert r.retry_after_s is not None and 0 < r.retry_after_s <= 1 / BULK_QUOTA + 1e-6, r.retry_after_s
