"""Small helpers shared by the tests: awaiting conditions instead of sleeping."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from broker.client import Client
from broker.config import load_config
from broker.connection import connect, wait_ready
from broker.errors import RedisUnavailable
from broker.settings import Settings
from broker.topology import Topology
from broker.wire import (
    ChatMessage,
    DeadLetter,
    Job,
    Result,
    decode_dead,
    decode_heartbeat,
    decode_policy_heartbeat,
    decode_result,
)
from tests.conftest import FAST_ENV
from workers.backend import Backend
from workers.worker import PoolWorker


def lane(topo: Topology, pool: str, slo: str = "standard") -> str:
    """The stream of ``pool`` that jobs of class ``slo`` ride under the default config."""
    return topo.pool(pool, load_config().lane(slo))


def lanes(topo: Topology, pool: str) -> list[str]:
    """Every stream of ``pool`` (one per priority lane) under the default config."""
    return [topo.pool(pool, i) for i in range(load_config().lanes)]


async def fails_at_once(url: str, within_s: float = 4) -> str:
    """The one-line error of ``wait_ready`` on ``url``, which must come within ``within_s``."""
    client = connect(url)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(RedisUnavailable) as caught:
            await wait_ready(client, url, timeout=30)
    finally:
        await client.aclose()
    assert loop.time() - started < within_s
    assert "\n" not in str(caught.value)
    return str(caught.value)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def policy_refreshed_after(client: aioredis.Redis, topo: Topology, at: float, what: str) -> None:
    """Wait until the policy worker has refreshed its view of the pools since ``at``.

    The policy worker writes its heartbeat right after a refresh, so a heartbeat stamped a
    heartbeat period after ``at`` follows a refresh that read what was there at ``at``.
    """
    seen_at = at + float(FAST_ENV["IB_HEARTBEAT_S"])

    async def refreshed() -> bool:
        beats = (await client.hgetall(topo.policy_heartbeats)).values()  # type: ignore[misc]
        return any(decode_policy_heartbeat(v).ts > seen_at for v in beats)

    await eventually(refreshed, timeout=30, what=what)


async def warm_up(sdk: Client, client: aioredis.Redis, topo: Topology, jobs: dict[str, Job]) -> list[Result]:
    """Run ``jobs`` (pool -> a job the router sends there) one by one, then wait until the policy
    has learned their timings. Admission refuses nothing on a pool that has finished no job
    (its predictions are profile guesses: policies/slo.py), so a test of refusals starts here.
    Returns the jobs' results.
    """
    results = []
    for pool, job in jobs.items():
        done = await sdk.run(job, timeout=30)
        assert done.status == "ok" and done.pool == pool, done.route_reason
        results.append(done)
    # A worker reports the timings of its finished jobs in its next heartbeat (they are
    # recorded before the result is published): wait for a beat of every pool sent since.
    since, latest = time.time(), 0.0

    async def every_pool_reported() -> bool:
        nonlocal latest
        for pool in jobs:
            beats = (await client.hgetall(topo.heartbeats(pool))).values()  # type: ignore[misc]
            ts = max((decode_heartbeat(v).ts for v in beats), default=0.0)
            if ts <= since:
                return False
            latest = max(latest, ts)
        return True

    await eventually(every_pool_reported, timeout=30, what="a heartbeat of every pool after the warm-up jobs")
    await policy_refreshed_after(client, topo, latest, "a policy refresh after the warm-up jobs' timings")
    return results


ACCEL_JOB = Job(id="warm-accel", model="llama-3.3-70b", messages=[ChatMessage("user", "x" * 20_000)], max_tokens=16,
                slo="interactive")
"""An interactive job only the accelerator meets: 5,000 prompt tokens of 70B take 410 ms to prefill on
an idle H100, over 80% of the 500 ms target, and 240 ms on the accelerator."""


def admitting_all(config_text: str) -> str:
    """Policy TOML ``config_text`` with admission off (``on_unattainable = "best_effort"``) in
    every class it defines: for tests that flood on purpose to test something else than
    admission, and must see every job run."""
    return re.sub(r"^(\[classes\.[^\]]+\])$", r'\1\non_unattainable = "best_effort"', config_text, flags=re.M)


def mixed_jobs(n: int, seed: int = 1, tag: str = "j") -> list[Job]:
    """``n`` small jobs across kinds, models and sizes (short outputs keep tests fast)."""
    rng = random.Random(seed)
    jobs: list[Job] = []
    for i in range(n):
        pick = i % 4
        model = rng.choice(["llama-3.1-8b", "llama-3.3-70b"])
        if pick == 0:  # interactive by rule: a chat with a short prompt
            jobs.append(Job(id=f"{tag}-{i}", model=model, kind="chat", max_tokens=rng.randint(1, 16),
                            messages=[ChatMessage("user", "x" * rng.randint(10, 4000))]))
        elif pick == 1:  # standard: a completion
            jobs.append(Job(id=f"{tag}-{i}", model=model, kind="completion", max_tokens=rng.randint(1, 16),
                            prompt="y" * rng.randint(10, 8000)))
        elif pick == 2:  # embeddings on the GPU pool's small model
            jobs.append(Job(id=f"{tag}-{i}", model="minilm-l6", kind="embedding", max_tokens=0,
                            texts=["z" * rng.randint(5, 200) for _ in range(rng.randint(1, 4))]))
        else:  # an explicit class hint
            jobs.append(Job(id=f"{tag}-{i}", model="llama-3.1-8b", kind="chat", max_tokens=rng.randint(1, 16),
                            slo=rng.choice(["batch", "standard", "interactive"]),
                            messages=[ChatMessage("user", "w" * rng.randint(10, 500))]))
    return jobs


async def result_counts(client: aioredis.Redis, topo: Topology) -> tuple[Counter[str], Counter[str]]:
    """Results on the default reply stream: (count per job id, count per status)."""
    ids: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    for _id, fields in await client.xrange(topo.reply("results")):
        result = decode_result(fields[b"result"])
        ids[result.id] += 1
        statuses[result.status] += 1
    return ids, statuses


async def only_dead_letter(client: aioredis.Redis, settings: Settings,
                           backend: Backend) -> tuple[DeadLetter, PoolWorker]:
    """Run a ``gpu`` pool worker on ``backend`` until a dead letter appears, and stop it: that letter
    (the only one) and the stopped worker."""
    worker = PoolWorker(client, settings, "gpu", backend, concurrency=4)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        await eventually(lambda: client.xlen(settings.topology.dead), what="the job's dead letter")
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    (letter,) = [decode_dead(f[b"dead"]) for _, f in await client.xrange(settings.topology.dead)]
    return letter, worker
