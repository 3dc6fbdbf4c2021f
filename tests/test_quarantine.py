"""Quarantine of suspects in sandboxes, against real worker processes and a real Redis.

A job whose workers died under it twice is a *suspect*: the next worker runs it in a
sandbox, a process of its own (workers/sandbox.py). A job that really kills its process
then kills only sandboxes, and innocent suspects (long jobs that were merely running when
workers were killed) no longer stop the pool taking new work.
"""

from __future__ import annotations

import asyncio
import signal

import redis.asyncio as aioredis

from broker import calls
from broker.client import Client
from broker.reclaim import CRASHED, Claimer
from broker.scripts import Scripts
from broker.streams import ensure_group
from broker.topology import WORKER_GROUP, Topology
from broker.wire import Job, decode_dead
from tests.conftest import FAST_ENV, Roles
from tests.helpers import eventually, lanes


async def test_a_job_is_a_suspect_when_its_last_delivery_left_no_error_or_crashed_its_sandbox(
        client: aioredis.Redis, prefix: str) -> None:
    topo = Topology(prefix)
    stream, errors = topo.pool("gpu"), topo.errors("gpu")
    await ensure_group(client, stream, WORKER_GROUP)
    entry_id = await client.xadd(stream, {"routed": b"x"})
    await client.xreadgroup(WORKER_GROUP, "w1", {stream: ">"})  # delivery 1; w1 dies
    scripts = Scripts(client)

    async def claim(consumer: str) -> tuple[int, int]:
        """A claim pass by ``consumer``: (entries taken to run in-process, suspects taken)."""
        claimed = await Claimer(scripts, stream, WORKER_GROUP, consumer, idle_ms=0, interval_s=0,
                                error_prefix=errors).claim(10, suspects=1)
        return len(claimed.entries), len(claimed.suspects)

    async def nack(consumer: str, error: str, delivery: int) -> None:
        await scripts.call(calls.nack(stream, WORKER_GROUP, entry_id, consumer, errors + entry_id.decode(),
                                      idle_ms=0, error=error, ttl_ms=60_000, delivery=delivery))

    assert await claim("w2") == (1, 0)  # one death is not enough to suspect it: delivery 2
    await nack("w2", "BackendError: 503", 2)  # it failed there: evidence, but not of a crash
    assert await claim("w3") == (1, 0)  # delivery 3, in-process; w3 dies under it
    assert await claim("w4") == (0, 1)  # its last delivery left no error: a suspect
    await nack("w4", CRASHED + "the process running it alone died (exit code 70)", 4)
    assert await claim("w5") == (0, 1)  # it killed its sandbox: still a suspect
    await nack("w5", "BackendError: 503", 5)
    assert await claim("w6") == (1, 0)  # a plain failure in the sandbox clears it


def completion(job_id: str, tokens: int, **metadata: str) -> Job:
    return Job(id=job_id, model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=tokens, metadata=metadata)


async def test_a_job_that_kills_its_process_kills_two_workers_then_only_sandboxes(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    env = {**FAST_ENV, "IB_MAX_DELIVERIES": "5"}
    roles.start("policy", env=env)
    workers = [roles.start("worker", "--pool", "gpu", env=env) for _ in range(2)]
    topo = Topology(prefix)
    # Neighbours of ~1 s each, submitted with the poison job so that they share its worker.
    neighbours = [completion(f"n-{i}", 200) for i in range(40)]
    deaths = 0
    async with Client(redis_url, prefix=prefix) as sdk:
        await sdk.submit_many([*neighbours[:20], completion("poison", 200, fault="crash"), *neighbours[20:]])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while await client.get(topo.done("poison")) is None:
            for i, w in enumerate(workers):
                if w.poll() is not None:  # restart it, as a supervisor would
                    assert w.returncode == 70, "only the injected crash may end a worker"
                    deaths += 1
                    workers[i] = roles.start("worker", "--pool", "gpu", env=env)
            assert loop.time() < deadline, "the poison job was never dead-lettered"
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*(sdk.result(j.id, timeout=30) for j in neighbours))
    assert all(w.poll() is None for w in workers)
    # The first two deliveries ran among neighbours (a job that outlived one dead worker is
    # presumed innocent) and took two workers down; the other three ran in sandboxes, where
    # they killed only the sandbox.
    assert deaths == 2
    letters = [decode_dead(f[b"dead"]) for _i, f in await client.xrange(topo.dead)]
    assert [d.job_id for d in letters] == ["poison"]
    assert letters[0].reason == "max_deliveries"
    assert "delivered 5 times" in letters[0].error
    assert "crashed: the process running it alone died (exit code 70)" in letters[0].error
    # Its neighbours lost a delivery to each of those two deaths at most, and all finished.
    assert all(r.status == "ok" for r in results)
    assert all(r.timing is not None and r.timing.attempt <= 3 for r in results)


async def test_innocent_suspects_run_beside_new_work_instead_of_stalling_the_pool(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    roles.start("policy", env=FAST_ENV)
    first = roles.start("worker", "--pool", "gpu", env=FAST_ENV)
    topo = Topology(prefix)
    # Long batch jobs (~8 s each on the simulated H100) are orphaned twice: the worker
    # holding them is killed, and so is the one that takes them over.
    long_jobs = [completion(f"long-{i}", 1500) for i in range(8)]
    async with Client(redis_url, prefix=prefix) as sdk:
        await sdk.submit_many(long_jobs)

        async def holders() -> dict[str, int]:
            held: dict[str, int] = {}
            for stream in lanes(topo, "gpu"):
                if await client.exists(stream):
                    for c in (await client.xpending(stream, WORKER_GROUP))["consumers"]:
                        held[c["name"].decode()] = held.get(c["name"].decode(), 0) + c["pending"]
            return held

        async def one_holds_them() -> bool:
            held = await holders()
            return len(held) == 1 and sum(held.values()) == len(long_jobs)

        victim = first
        for survivors in (1, 2):
            await eventually(one_holds_them, what="one worker to hold every long job")
            victim_name = next(iter(await holders()))
            # The next workers start before the kill, so they take the orphans over.
            for _ in range(survivors):
                successor = roles.start("worker", "--pool", "gpu", env=FAST_ENV)
            victim.send_signal(signal.SIGKILL)
            victim.wait()

            async def taken_over(victim_name: str = victim_name) -> bool:
                held = await holders()
                return victim_name not in held and sum(held.values()) == len(long_jobs)

            await eventually(taken_over, what="the orphans to be taken over")
            victim = successor
        # Interactive chats arrive while the suspects run (they take several seconds).
        chats = []
        for i in range(20):
            chats.append(Job.chat("llama-3.1-8b", f"hi {i}", max_tokens=16, slo="interactive"))
            await sdk.submit(chats[-1])
            await asyncio.sleep(0.1)
        quick = await asyncio.gather(*(sdk.result(j.id, timeout=30) for j in chats))
        long_results = await asyncio.gather(*(sdk.result(j.id, timeout=60) for j in long_jobs))
    assert all(r.status == "ok" for r in quick + long_results)
    assert all(r.timing is not None and r.timing.attempt == 3 for r in long_results)
    # The chats were not held back behind the suspects: each started within a fraction of a
    # second (with the old run-alone quarantine they waited for the long jobs to end).
    waits = sorted(r.metrics.queue_time_ms for r in quick if r.metrics is not None)
    assert len(waits) == len(chats) and waits[-1] < 500, waits
    # ...and they really ran while the suspects did.
    assert max(r.timing.started_at for r in quick if r.timing) < max(r.timing.finished_at for r in long_results
                                                                     if r.timing)
