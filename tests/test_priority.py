"""Priority inside a live pool: interactive jobs overtake a batch backlog on the same worker."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from broker.client import Client
from broker.topology import Topology
from broker.wire import Job
from tests.conftest import FAST_ENV, Roles

# One GPU pool, two slots, three priorities: every job shares the same worker.
CONFIG = """
default_class = "standard"
default_pool = "gpu"

[classes.interactive]
ttft_ms = 500
priority = 0

[classes.standard]
ttft_ms = 2000
priority = 1

[classes.batch]
ttft_ms = 60000
priority = 2

[pools.gpu]
models = ["llama-3.1-8b"]
profile = "h100"
concurrency = 2
"""
BATCH, URGENT = 24, 4


async def test_interactive_jobs_overtake_a_batch_backlog(roles: Roles, redis_url: str, prefix: str,
                                                         client: aioredis.Redis, tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(CONFIG)
    env = {**FAST_ENV, "IB_CONFIG": str(config)}
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "gpu", env=env)
    topo = Topology(prefix)

    def job(i: int, slo: str) -> Job:
        return Job(id=f"{slo}-{i}", model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=40, slo=slo)

    async with Client(redis_url, prefix=prefix) as sdk:
        await sdk.submit_many([job(i, "batch") for i in range(BATCH)])
        # Once the first batch job is done the worker is busy and the rest queue behind it.
        await sdk.result("batch-0", timeout=30)
        queued = sum([await client.xlen(topo.pool("gpu", lane)) for lane in range(3)])
        await sdk.submit_many([job(i, "interactive") for i in range(URGENT)])
        results = [await sdk.result(j, timeout=60) for j in
                   [f"batch-{i}" for i in range(BATCH)] + [f"interactive-{i}" for i in range(URGENT)]]

    assert all(r.status == "ok" and r.timing for r in results), results
    started = {r.id: r.timing.started_at for r in results if r.timing}
    last_urgent = max(started[f"interactive-{i}"] for i in range(URGENT))
    overtaken = [j for j, t in started.items() if j.startswith("batch") and t > last_urgent]
    # FIFO would start every interactive job after the whole backlog (none overtaken). With
    # lanes, only the jobs already running (2 slots) and the few started while the
    # interactive ones were still being routed go first.
    assert queued >= BATCH // 2, "the backlog drained before the interactive jobs came"
    assert len(overtaken) >= queued - 2 * URGENT, (queued, sorted(started.items(), key=lambda kv: kv[1]))
    assert {r.slo for r in results} == {"batch", "interactive"}
