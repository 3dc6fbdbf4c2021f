"""Small helpers shared by the tests: awaiting conditions instead of sleeping."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from broker.config import load_config
from broker.topology import Topology
from broker.wire import ChatMessage, Job


def lane(topo: Topology, pool: str, slo: str = "standard") -> str:
    """The stream of ``pool`` that jobs of class ``slo`` ride under the default config."""
    return topo.pool(pool, load_config().lane(slo))


def lanes(topo: Topology, pool: str) -> list[str]:
    """Every stream of ``pool`` (one per priority lane) under the default config."""
    return [topo.pool(pool, i) for i in range(load_config().lanes)]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


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
        data = json.loads(fields[b"result"])
        ids[data["id"]] += 1
        statuses[data["status"]] += 1
    return ids, statuses
