"""Priority inside a live pool: interactive jobs overtake a batch backlog on the same worker."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aioredis

from broker.client import Client
from broker.topology import Topology
from broker.wire import Job
from tests.conftest import FAST_ENV, Roles

# One GPU pool, two slots, three priorities: every job shares the same worker. Admission off:
# the test is about the order the lanes run in, and needs every job to run (a CPU-starved
# device could make an interactive job predicted late behind the two running ones).
CONFIG = """
default_class = "standard"
default_pool = "gpu"

[classes.interactive]
ttft_ms = 500
priority = 0
on_unattainable = "best_effort"

[classes.standard]
ttft_ms = 2000
priority = 1
on_unattainable = "best_effort"

[classes.batch]
ttft_ms = 60000
priority = 2
on_unattainable = "best_effort"

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


# One 4-slot worker; batch keeps a quarter of its slots. Static routing: every job is
# admitted to the one pool, whatever the classes' admission settings.
SHARED = """
default_class = "batch"
default_pool = "gpu"

[routing]
policy = "static"

[classes.interactive]
ttft_ms = 500
priority = 0

[classes.batch]
ttft_ms = 60000
priority = 1
min_share = 0.25

[pools.gpu]
models = ["llama-3.1-8b"]
profile = "h100"
concurrency = 4
"""
FLOOD, STEADY = 120, 60


async def test_batch_keeps_its_share_of_a_worker_under_an_interactive_flood(roles: Roles, redis_url: str,
                                                                            prefix: str, tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(SHARED)
    env = {**FAST_ENV, "IB_CONFIG": str(config)}
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "gpu", env=env)

    def job(i: int, slo: str) -> Job:
        return Job(id=f"{slo}-{i}", model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=16, slo=slo)

    async with Client(redis_url, prefix=prefix) as sdk:
        # Interactive work first: with strict priority none of the batch jobs would start
        # before the last interactive one, the flood standing for a load that never ends.
        await sdk.submit_many([job(i, "interactive") for i in range(FLOOD)])
        await sdk.submit_many([job(i, "batch") for i in range(STEADY)])
        results = [await sdk.result(j, timeout=60) for j in
                   [f"interactive-{i}" for i in range(FLOOD)] + [f"batch-{i}" for i in range(STEADY)]]

    assert all(r.status == "ok" and r.timing for r in results), results
    started = sorted((r.timing.started_at, r.slo) for r in results if r.timing)
    flood_end = max(t for t, slo in started if slo == "interactive")
    during = [slo for t, slo in started if t < flood_end]
    batch = during.count("batch") / len(during)
    # Its reserved slot runs batch jobs while interactive ones keep queuing on the other three.
    assert batch >= 0.25 * 0.8, (batch, started)
    assert during.count("interactive") >= 0.6 * len(during), started
