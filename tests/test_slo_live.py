"""The SLO-aware router in the live policy worker: routes by prediction, sheds what it cannot serve."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from broker.client import Client
from broker.config import default_config_text, load_config
from broker.policy_worker import PolicyWorker
from broker.settings import Settings
from broker.topology import POLICY_GROUP, WORKER_GROUP, Topology
from broker.wire import ChatMessage, Job
from cli.stack import wait_for_roles
from evaluation.baselines import ROUTERS
from policies import PoolState
from tests.conftest import FAST_ENV, Roles
from tests.helpers import ACCEL_JOB, policy_refreshed_after, warm_up

SLO_CONFIG = default_config_text() + '''
[routing]
policy = "slo"

[classes.instant]
ttft_ms = 1
on_unattainable = "shed"
'''


async def wait_until_policy_sees(redis_url: str, client: aioredis.Redis, topo: Topology, pools: list[str]) -> None:
    """Wait until the policy worker has refreshed its view since every pool had a live worker."""
    await asyncio.to_thread(wait_for_roles, redis_url, topo, dict.fromkeys(pools, 1))
    await policy_refreshed_after(client, topo, time.time(), "a policy heartbeat after the pools' first ones")


async def test_slo_router_routes_and_sheds_live(roles: Roles, redis_url: str, prefix: str, tmp_path: Path,
                                               client: aioredis.Redis) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(SLO_CONFIG)
    env = {**FAST_ENV, "IB_CONFIG": str(config)}
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "gpu", env=env)
    roles.start("worker", "--pool", "accel", env=env)
    # Route only once the policy has seen both pools live: a job routed before the GPU
    # worker's first heartbeat goes to the accelerator, as it should (no live GPU worker).
    await wait_until_policy_sees(redis_url, client, Topology(prefix), ["gpu", "accel"])
    chat = [ChatMessage("user", "hello " * 50)]
    async with Client(redis_url, prefix=prefix) as sdk:
        served = [await sdk.run(Job(id=f"slo-{i}", model="llama-3.1-8b", messages=chat, max_tokens=32), timeout=30)
                  for i in range(5)]
        # The 1 ms target misses on both pools: both must have finished a job before it is refused.
        await warm_up(sdk, client, Topology(prefix),
                      {"gpu": Job(id="warm-gpu", model="llama-3.1-8b", messages=chat, max_tokens=32),
                       "accel": ACCEL_JOB})
        shed = await sdk.run(Job(id="too-fast", model="llama-3.1-8b", messages=chat, slo="instant"), timeout=30)
    for r in served:
        assert r.status == "ok" and r.slo == "interactive"
        # An idle H100 meets the interactive target and is cheaper: the SLO router keeps it there.
        assert r.pool == "gpu", r.route_reason
        assert r.route_reason and "ttft" in r.route_reason
    assert shed.status == "rejected" and shed.error and shed.error.startswith("slo_unattainable")
    assert shed.timing is None


# Admission on (`shed`) for `interactive` and `instant`; `patient` runs best-effort. One pool
# of one slot, so two long jobs make a queue; a 1 ms TTFT is out of reach of any device.
ADMISSION_CONFIG = '''
default_class = "interactive"
default_pool = "gpu"

[classes.interactive]
ttft_ms = 500
on_unattainable = "shed"

[classes.instant]
ttft_ms = 1
on_unattainable = "shed"

[classes.patient]
ttft_ms = 1
on_unattainable = "best_effort"

[pools.gpu]
models = ["llama-3.1-8b"]
concurrency = 1
'''


async def test_admission_refuses_at_once_what_no_pool_can_serve_in_time(
        roles: Roles, redis_url: str, prefix: str, tmp_path: Path, client: aioredis.Redis) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(ADMISSION_CONFIG)
    env = {**FAST_ENV, "IB_CONFIG": str(config)}
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "gpu", env=env)
    await wait_until_policy_sees(redis_url, client, Topology(prefix), ["gpu"])
    chat = [ChatMessage("user", "hello " * 50)]
    async with Client(redis_url, prefix=prefix) as sdk:
        # One job like the blockers below (about 2.3 s on the one slot): the pool has finished a
        # job, and its mean service time is theirs, so the wait behind them is predicted right.
        await warm_up(sdk, client, Topology(prefix),
                      {"gpu": Job(id="warm", model="llama-3.1-8b", messages=chat, slo="patient", max_tokens=500)})
        # A target no device meets: refused even on the idle pool, with no retry hint.
        impossible = await sdk.run(Job(id="too-fast", model="llama-3.1-8b", messages=chat, slo="instant"), timeout=30)
        # Two long best-effort jobs (about 2.3 s each on the one slot): one runs, one queues.
        blockers = [Job(id=f"long-{i}", model="llama-3.1-8b", messages=chat, slo="patient", max_tokens=500)
                    for i in range(2)]
        await sdk.submit_many(blockers)
        # An interactive job behind them would wait seconds for a 500 ms target: refused at once,
        # with when to come back, while the queue it would have joined still runs.
        overloaded = await sdk.run(Job(id="behind", model="llama-3.1-8b", messages=chat, max_tokens=500), timeout=30)
        running = await client.exists(Topology(prefix).done("long-1"))
        first = await sdk.result("long-0", timeout=30)
        cli = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "cli", "submit", "--redis-url", redis_url, "--prefix", prefix,
                             "--slo", "instant", "--prompt", "hi", "--timeout", "30"],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert impossible.status == "rejected" and impossible.slo == "instant"
    assert impossible.timing is None and impossible.pool is None and impossible.retry_after_s is None
    assert impossible.error and impossible.error.startswith("slo_unattainable: no pool can serve instant in time: ")
    assert "even on an idle pool" in impossible.error
    assert overloaded.status == "rejected" and overloaded.slo == "interactive" and overloaded.timing is None
    assert overloaded.error and overloaded.error.startswith("slo_unattainable: no pool can serve interactive in time")
    assert overloaded.retry_after_s is not None and overloaded.retry_after_s >= 1
    assert f"retry after {overloaded.retry_after_s:.0f} s" in overloaded.error
    assert not running  # refused before the queue it would have joined had drained
    # An explicit best_effort class is admitted however late it will be.
    assert first.status == "ok" and first.slo == "patient" and first.slo_met is False
    # The CLI shows the refusal and exits 2, as for any job that did not end ok.
    assert cli.returncode == 2, cli.stderr
    assert ": rejected" in cli.stdout and "slo_unattainable" in cli.stdout, cli.stdout


FLOOD = 300


async def test_the_default_config_sheds_a_flood_with_a_retry_hint(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    # The built-in config, nothing overridden: admission is on for every class. One GPU worker
    # (64 slots) and one accelerator (8) get 300 interactive jobs at once, each about 1.3 s of
    # decoding at full load: a few hundred milliseconds of queue is all a 500 ms target allows.
    roles.start("policy", env=FAST_ENV)
    roles.start("worker", "--pool", "gpu", env=FAST_ENV)
    roles.start("worker", "--pool", "accel", env=FAST_ENV)
    topo = Topology(prefix)
    await wait_until_policy_sees(redis_url, client, topo, ["gpu", "accel"])
    chat = [ChatMessage("user", "hello " * 50)]

    def flood_job(name: str) -> Job:
        return Job(id=name, model="llama-3.1-8b", messages=chat, max_tokens=200)

    async with Client(redis_url, prefix=prefix) as sdk:
        # Jobs like the flood's, so that each pool's learned service time is theirs.
        await warm_up(sdk, client, topo, {"gpu": flood_job("warm-gpu"), "accel": ACCEL_JOB})
        jobs = [flood_job(f"flood-{i}") for i in range(FLOOD)]
        await sdk.submit_many(jobs)
        results = await asyncio.gather(*(sdk.result(j.id, timeout=60) for j in jobs))
    refused = [r for r in results if r.status == "rejected"]
    served = [r for r in results if r.status == "ok"]
    assert len(refused) + len(served) == FLOOD
    assert served and refused, (len(served), len(refused))
    for r in refused:  # refused at once, and the producer is told why and when to come back
        assert r.slo == "interactive" and r.timing is None and r.pool is None
        assert r.error and r.error.startswith("slo_unattainable: no pool can serve interactive in time: "), r.error
        assert r.retry_after_s is not None and r.retry_after_s >= 1, r.error
        assert f"retry after {r.retry_after_s:.0f} s" in r.error
    # The flood's first jobs run: refusals start only once the queue is long.
    assert all(r.status == "ok" for r in results[:64]), [r.error for r in results[:64] if r.status != "ok"]


async def test_the_policy_sees_a_pool_cooling_only_while_every_live_worker_is(
        redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    settings = Settings(redis_url=redis_url, prefix=prefix)
    policy = PolicyWorker(client, settings, load_config())
    now = time.time()
    beats = settings.topology.heartbeats("accel")

    async def beat(worker: str, cooling_until: float | None, ts: float = now) -> None:
        await client.hset(beats, worker, json.dumps({"ts": ts, "in_flight": 0, "capacity": 8, "seq": 1,
                                                     "obs": [], "cooling_until": cooling_until}))

    await beat("a", now + 5)
    await beat("b", None)
    await policy.refresh()
    assert policy.snapshot.pools["accel"].cooling_until is None  # b can take work
    await beat("b", now + 3)
    await beat("gone", None, ts=now - 3600)  # a dead worker's last beat does not count
    await policy.refresh()
    assert policy.snapshot.pools["accel"].cooling_until == pytest.approx(now + 3)  # the first back
    assert policy.snapshot.pools["accel"].cooling(now + 1) and not policy.snapshot.pools["accel"].cooling(now + 4)


@pytest.mark.parametrize("router", ["slo", "round_robin"])
async def test_identical_jobs_reuse_a_decision_until_the_policys_own_routing_fills_a_step(
        router: str, redis_url: str, prefix: str, client: aioredis.Redis, tmp_path: Path) -> None:
    settings = Settings(redis_url=redis_url, prefix=prefix)
    policy = PolicyWorker(client, settings, load_config())
    policy.decider.router = ROUTERS[router](policy.config)  # round robin: a router that may not reuse a decision
    await policy.setup()
    seen: list[int] = []  # the gpu backlog each real decision saw
    live = policy.decider.router
    decide = live.decide
    live.decide = lambda job, slo, snap, rng: seen.append(snap.pools.get("gpu", PoolState()).backlog) or \
        decide(job, slo, snap, rng)  # type: ignore[method-assign]
    n = 40
    async with Client(redis_url, prefix=prefix) as sdk:
        await sdk.submit_many([Job(id=f"same-{i}", model="llama-3.1-8b", kind="completion", prompt="hi",
                                   max_tokens=16) for i in range(n)])
    reply = await client.xreadgroup(POLICY_GROUP, policy.name, {settings.topology.jobs: ">"}, count=n)
    await policy.routers[0].handle([(entry, 1) for entry in reply[0][1]])

    routed = sum([await client.xlen(s) for lanes in policy.routers[0].lanes.values() for s in lanes])
    assert routed == n
    if router == "slo":
        # No live worker: every job waits on the default pool, gpu (concurrency 64: steps of 4).
        step = 64 // 16
        assert seen == list(range(0, n, step))  # decided anew once per step, seeing the jobs routed before
        assert policy.snapshot.pools["gpu"].backlog == n
    else:
        assert len(seen) == n  # round robin keeps state per call: never reused


async def test_the_snapshot_counts_each_lanes_queue_and_the_running_work(
        redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    settings = Settings(redis_url=redis_url, prefix=prefix)
    policy = PolicyWorker(client, settings, load_config())
    await policy.setup()
    lanes = policy.routers[0].lanes["gpu"]  # interactive, standard, batch
    hints = ["batch"] * 6 + ["standard"] * 3 + ["interactive"] * 2
    async with Client(redis_url, prefix=prefix) as sdk:
        await sdk.submit_many([Job(id=f"j{i}", model="llama-3.1-8b", kind="completion", prompt="hi", max_tokens=16,
                                   slo=hint) for i, hint in enumerate(hints)])  # type: ignore[arg-type]
    await policy.refresh()  # nothing routed yet: every lane empty
    assert policy.snapshot.pools["gpu"].queued == (0, 0, 0)
    reply = await client.xreadgroup(POLICY_GROUP, policy.name, {settings.topology.jobs: ">"}, count=len(hints))
    await policy.routers[0].handle([(entry, 1) for entry in reply[0][1]])
    # Its own routing, counted on each job's lane until the next refresh (no worker: all on gpu),
    # in steps of 4 jobs (64 slots / 16): the first 8, six batch and two standard.
    assert policy.snapshot.pools["gpu"].queued == (0, 2, 6) and policy.snapshot.pools["gpu"].backlog == 8

    # A worker takes two batch jobs (its slots are free): they run, the rest wait.
    await client.xreadgroup(WORKER_GROUP, "w", {lanes[2]: ">"}, count=2)
    await policy.refresh()
    gpu = policy.snapshot.pools["gpu"]
    assert (gpu.backlog, gpu.queued) == (11, (2, 3, 4))
    assert (gpu.ahead(0), gpu.ahead(1), gpu.ahead(2)) == (4, 7, 11)

    # A deleted unread entry hides the group's lag (Redis answers nil): the stream's length
    # less the pending entries is what waits.
    newest = (await client.xrevrange(lanes[2], count=1))[0][0]
    await client.xdel(lanes[2], newest)
    assert (await client.xinfo_groups(lanes[2]))[0]["lag"] is None
    await policy.refresh()
    gpu = policy.snapshot.pools["gpu"]
    assert (gpu.backlog, gpu.queued) == (10, (2, 3, 3))
