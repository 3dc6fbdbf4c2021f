"""Token streaming: a job with ``stream=True`` shows its output as it is generated."""

from __future__ import annotations

import subprocess
import sys

import redis.asyncio as aioredis

from broker.client import Client
from broker.topology import Topology
from broker.wire import ChatMessage, Job
from tests.conftest import FAST_ENV, ROOT, Roles
from tests.deployments import ON_BOTH

pytestmark = ON_BOTH


async def test_tokens_arrive_while_the_job_runs_and_the_result_follows(
        roles: Roles, redis_url: str, prefix: str, shards: int, topo: Topology, client: aioredis.Redis) -> None:
    roles.policy()
    roles.worker("gpu")
    # ~1 s of decoding on the simulated H100 70B model: 32-token chunks every ~0.15 s.
    job = Job(id="streamed", model="llama-3.3-70b", kind="completion", prompt="p", max_tokens=100, stream=True)
    topo = topo.of_job(job.id)  # its result and token stream live on its shard
    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        await sdk.submit(job)
        chunks, done_at_first = [], None
        async for chunk in sdk.tokens(job.id, timeout=30):
            if done_at_first is None:
                done_at_first = await client.exists(topo.done(job.id))
            chunks.append(chunk)
        result = await sdk.result(job.id, timeout=30)
    assert result.status == "ok" and result.usage.completion_tokens == 100
    assert "".join(c.text for c in chunks).split() == ["tok"] * 100  # every token, once, in order
    assert done_at_first == 0, "the first tokens came only after the job had finished"
    assert len(chunks) >= 3  # as the device decoded, not in one piece at the end
    assert {c.attempt for c in chunks} == {1}
    assert 0 < await client.pttl(topo.tokens(job.id)) <= 3600 * 1000  # it expires with the result


async def test_a_failing_job_ends_its_token_stream_and_the_reader(
        roles: Roles, redis_url: str, prefix: str, shards: int) -> None:
    roles.start("policy", env=FAST_ENV)
    roles.start("worker", "--pool", "gpu", env=FAST_ENV)
    job = Job(id="streamed-fails", model="llama-3.1-8b", kind="chat", max_tokens=50, stream=True,
              messages=[ChatMessage("user", "hi")], metadata={"fault": "transient"})
    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        await sdk.submit(job)
        got = [chunk async for chunk in sdk.tokens(job.id, timeout=30)]  # ends: no hang on retries
        result = await sdk.result(job.id, timeout=30)
    assert got == [] and result.status == "failed" and "max_deliveries" in (result.error or "")


def test_submit_stream_prints_the_output_then_the_result(roles: Roles) -> None:
    roles.policy()
    roles.worker("gpu")
    out = subprocess.run(
        [sys.executable, "-m", "cli", "submit", "--stream", "--prompt", "hi", "--max-tokens", "40", *roles.options],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    first, *rest = out.stdout.splitlines()
    assert first.split() == ["tok"] * 40
    assert any(line.startswith("job ") and line.endswith(": ok") for line in rest)
