"""Fault injection around the policy worker: SIGKILL while routing, two at once, backpressure.

Real processes against the session's real redis-server. No pool workers run while jobs
are routed, so every routed job stays on its pool stream (pool entries are deleted only on
completion) and the pool streams can be read back as the exact record of what was routed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import redis.asyncio as aioredis

from broker.client import Client
from broker.errors import Backpressure
from broker.topology import POLICY_GROUP, WORKER_GROUP, Topology
from broker.wire import Job, decode_policy_heartbeat
from tests.conftest import FAST_ENV, ROOT, Roles
from tests.helpers import eventually, lanes, mixed_jobs, result_counts

POOLS = ("gpu", "accel")


def small_jobs(n: int, tag: str, seed: int = 3) -> list[Job]:
    """Jobs across kinds, classes and both pools, with short outputs so they finish fast."""
    return mixed_jobs(n, seed=seed, tag=tag)


async def drained(client: aioredis.Redis, stream: str, group: str) -> bool:
    """No entry left on ``stream`` and none pending in ``group``."""
    if await client.xlen(stream):
        return False
    groups = await client.xinfo_groups(stream)
    return all(g["pending"] == 0 for g in groups if g["name"] == group.encode())


async def routed_ids(client: aioredis.Redis, topo: Topology) -> Counter[str]:
    """Job ids on the pool streams, counted: the `routed` field's JSON carries the job."""
    seen: Counter[str] = Counter()
    for stream in (s for pool in POOLS for s in lanes(topo, pool)):
        for _id, fields in await client.xrange(stream):
            seen[json.loads(fields[b"routed"])["job"]["id"]] += 1
    return seen




async def started(client: aioredis.Redis, topo: Topology, proc: subprocess.Popen[bytes]) -> str:
    """Wait for a policy process' first heartbeat; return its consumer name (it carries the pid)."""
    marker = f"-{proc.pid}-"
    found: list[str] = []

    async def beating() -> bool:
        assert proc.poll() is None, f"policy worker exited with {proc.returncode}"
        found.extend(n.decode() for n in await client.hkeys(topo.policy_heartbeats) if marker in n.decode())
        return bool(found)

    await eventually(beating, timeout=20, what=f"policy worker {proc.pid} to start")
    return found[0]


async def holding(client: aioredis.Redis, topo: Topology, proc: subprocess.Popen[bytes],
                  timeout: float = 3.0) -> str:
    """Poll (no pause: the window is milliseconds) until ``proc`` holds ingress entries it
    has not routed yet; return its consumer name. After ``timeout`` s, whatever it is doing."""
    marker = f"-{proc.pid}-"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"policy worker exited with {proc.returncode}"
        summary = await client.xpending(topo.jobs, POLICY_GROUP)
        for c in summary["consumers"]:
            if marker in c["name"].decode():
                return c["name"].decode()
    return await started(client, topo, proc)


async def pending_of(client: aioredis.Redis, topo: Topology, consumer: str) -> int:
    rows = await client.xpending_range(topo.jobs, POLICY_GROUP, min="-", max="+", count=1000,
                                       consumername=consumer)
    return len(rows)


async def complete_all(roles: Roles, client: aioredis.Redis, topo: Topology, ids: set[str]) -> None:
    """Start one worker per pool and check every job ends with exactly one ok result."""
    for pool in POOLS:
        roles.start("worker", "--pool", pool, "--grace", "5", env=FAST_ENV)

    async def done() -> bool:
        return all([await drained(client, s, WORKER_GROUP) for p in POOLS for s in lanes(topo, p)])

    await eventually(done, timeout=30, what="both pools to drain")
    got, statuses = await result_counts(client, topo)
    assert set(got) == ids
    assert [i for i, n in got.items() if n != 1] == []
    assert statuses == Counter(ok=len(ids))
    assert await client.xlen(topo.dead) == 0


async def test_sigkilled_policy_workers_route_every_job_exactly_once(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    topo = Topology(prefix)
    pace, when = random.Random(20260), random.Random(20261)  # one seed per task: same draws every run
    # Each kill costs the entries it held one delivery; these are not poison jobs, so lift
    # the dead-letter bound well above the number of kills (FAST_ENV's 3 would be reached).
    env = {**FAST_ENV, "IB_MAX_DELIVERIES": "50"}
    jobs = small_jobs(1000, "k")
    ids = {j.id for j in jobs}
    assert len(ids) == 1000
    kills: list[tuple[str, int]] = []  # (consumer name, entries it held unrouted when killed)

    async def produce(sdk: Client) -> None:
        for start in range(0, len(jobs), 20):
            assert len(await sdk.submit_many(jobs[start:start + 20])) == len(jobs[start:start + 20])
            await asyncio.sleep(pace.uniform(0, 0.4))  # pacing: spread the flow over the kills

    async def kill_loop() -> None:
        for i in range(10):
            proc = roles.start("policy", env=env)
            if i % 3 == 0:
                name = await started(client, topo, proc)
                await asyncio.sleep(when.uniform(0, 0.6))  # a random point in its life
            else:
                # Aimed: kill the moment it holds entries it has read (or claimed) but not yet
                # routed; at start-up it takes the backlog that built up while it was down.
                name = await holding(client, topo, proc)
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            kills.append((name, await pending_of(client, topo, name)))

    async with Client(redis_url, prefix=prefix) as sdk:
        await asyncio.gather(produce(sdk), kill_loop())
    survivor = roles.start("policy", env=env)
    survivor_name = await started(client, topo, survivor)

    await eventually(lambda: drained(client, topo.jobs, POLICY_GROUP), timeout=20,
                     what="the ingress stream to drain and its pending list to empty")
    assert len(kills) == 10
    # The takeover path ran: aimed kills left read-but-unrouted entries behind.
    assert sum(1 for _name, held in kills if held) >= 2, kills
    seen = await routed_ids(client, topo)
    assert set(seen) == ids, f"missing: {sorted(ids - set(seen))[:10]}, unknown: {sorted(set(seen) - ids)[:10]}"
    assert [i for i, n in seen.items() if n != 1] == []
    assert await client.xlen(topo.dead) == 0
    for pool in POOLS:
        assert await client.exists(*lanes(topo, pool)) == len(lanes(topo, pool))

    # The janitor forgets the dead policies once they hold nothing (2 x claim idle).
    async def only_survivor() -> bool:
        names = {c["name"].decode() for c in await client.xinfo_consumers(topo.jobs, POLICY_GROUP)}
        return names == {survivor_name}

    await eventually(only_survivor, timeout=15, what="dead policy consumers to be removed")
    await complete_all(roles, client, topo, ids)
    assert survivor.poll() is None


async def test_two_policy_workers_at_once_never_route_a_job_twice(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    topo = Topology(prefix)
    policies = [roles.start("policy", env=FAST_ENV) for _ in range(2)]
    names = [await started(client, topo, p) for p in policies]
    jobs = small_jobs(1000, "two", seed=5)
    ids = {j.id for j in jobs}
    # Every fifth job is submitted twice (a producer retry after a lost reply): the two
    # entries of one id may land on different policy workers at the same moment.
    stream = [x for j in jobs for x in ((j, j) if int(j.id.split("-")[1]) % 5 == 0 else (j,))]
    async with Client(redis_url, prefix=prefix) as sdk:
        for start in range(0, len(stream), 50):
            await sdk.submit_many(stream[start:start + 50])
            await asyncio.sleep(0.02)  # pacing, so both blocked readers get fresh entries

    await eventually(lambda: drained(client, topo.jobs, POLICY_GROUP), timeout=20,
                     what="the ingress stream to drain")
    seen = await routed_ids(client, topo)
    assert set(seen) == ids
    assert [i for i, n in seen.items() if n != 1] == []
    assert await client.xlen(topo.dead) == 0

    # Both really routed (their heartbeats count what each handled).
    async def routed_by() -> dict[str, int]:
        beats = (await client.hgetall(topo.policy_heartbeats)).items()  # type: ignore[misc]
        return {k.decode(): decode_policy_heartbeat(v).routed for k, v in beats}

    async def both_worked() -> bool:
        routed = await routed_by()
        return sum(routed.get(n, 0) for n in names) == len(stream)

    await eventually(both_worked, timeout=5, what="heartbeats to count every routed entry")
    routed = await routed_by()
    assert all(routed[n] > 0 for n in names), routed
    await complete_all(roles, client, topo, ids)
    assert all(p.poll() is None for p in policies)


async def test_submitting_beyond_the_backlog_bound_raises_backpressure(
        redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    topo = Topology(prefix)
    jobs = [Job.chat("llama-3.1-8b", "hi", id=f"bp-{i}") for i in range(80)]
    async with Client(redis_url, prefix=prefix, max_backlog=50) as sdk:
        started_at = time.monotonic()
        try:
            await sdk.submit_many(jobs, chunk=30)  # the bound falls inside the second chunk
        except Backpressure as exc:
            error = exc
        else:
            raise AssertionError("no Backpressure beyond the bound")
        assert time.monotonic() - started_at < 2  # fails fast, does not wait for room
        assert error.accepted == [j.id for j in jobs[:50]]
        assert "backlog is full" in str(error) and "50 jobs waiting, limit 50" in str(error)
        assert "retry later" in str(error)
        assert await client.xlen(topo.jobs) == 50
        # Once full, a single submit is refused with nothing accepted, and nothing is added.
        try:
            await sdk.submit(Job.chat("llama-3.1-8b", "one more", id="bp-late"))
        except Backpressure as exc:
            assert exc.accepted == []
        else:
            raise AssertionError("no Backpressure on a full backlog")
        assert await client.xlen(topo.jobs) == 50
        ingress = [json.loads(f[b"job"])["id"] for _i, f in await client.xrange(topo.jobs)]
        assert ingress == [j.id for j in jobs[:50]]


async def test_backpressure_accepted_lists_every_job_that_went_in_while_the_backlog_drains(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    topo = Topology(prefix)
    await started(client, topo, roles.policy())  # routing (no pool workers): the backlog drains
    async with Client(redis_url, prefix=prefix, max_backlog=50) as sdk:
        for attempt in range(3):
            # One big pipelined chunk: Redis reads it in pieces and serves the policy in between.
            batch = [Job(id=f"drain{attempt}-{i}", model="llama-3.1-8b", kind="completion",
                         prompt="x" * 300, max_tokens=2) for i in range(3000)]
            try:
                await sdk.submit_many(batch, chunk=len(batch))
            except Backpressure as exc:
                accepted = set(exc.accepted)
            else:
                accepted = {j.id for j in batch}
            await eventually(lambda: drained(client, topo.jobs, POLICY_GROUP), timeout=20,
                             what="the ingress stream to drain")
            went_in = {i for i in await routed_ids(client, topo) if i.startswith(f"drain{attempt}-")}
            assert accepted <= went_in  # nothing is reported accepted that did not go in
            missing = went_in - accepted
            assert not missing, f"{len(missing)} jobs went in but are not in accepted, e.g. {sorted(missing)[:3]}"


async def test_cli_submit_reports_a_full_backlog_as_a_clear_error(
        redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    topo = Topology(prefix)
    async with Client(redis_url, prefix=prefix) as sdk:
        await sdk.submit_many([Job.chat("llama-3.1-8b", "hi", id=f"cli-{i}") for i in range(3)])
    env = {**os.environ, "IB_MAX_BACKLOG": "3"}
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cli", "submit", "--redis-url", redis_url, "--prefix", prefix,
         "--prompt", "Hello", "--no-wait"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "error: the ingress backlog is full (3 jobs waiting, limit 3)" in proc.stderr
    assert proc.stdout == ""  # no job id printed: nothing was submitted
    assert await client.xlen(topo.jobs) == 3


async def test_a_job_that_ended_at_the_policy_is_not_routed_when_sent_again(
        redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    # ROUTE checks only the routed marker, so an outcome reached at the policy (expired,
    # dead-lettered) must leave one too: a copy sent again is acked, not run.
    from broker.config import load_config
    from broker.policy_worker import PolicyWorker
    from broker.settings import Settings

    settings = Settings(redis_url=redis_url, prefix=prefix)
    topo = settings.topology
    policy = PolicyWorker(client, settings, load_config())
    await policy.setup()

    async def route(*jobs: Job) -> None:
        async with Client(redis_url, prefix=prefix) as sdk:
            await sdk.submit_many(list(jobs))
        reply = await client.xreadgroup(POLICY_GROUP, policy.name, {topo.jobs: ">"}, count=10)
        await policy.routers[0].handle([(entry, 1) for entry in reply[0][1]])

    late = Job(id="late", model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=4, deadline=time.time() - 1)
    odd = Job(id="odd", model="no-such-model", kind="completion", prompt="p", max_tokens=4)
    await route(late, odd)
    fixed = [Job(id=job.id, model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=4) for job in (late, odd)]
    await route(*fixed)
    await route(Job(id="fresh", model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=4))

    routed = [entry for stream in lanes(topo, "gpu") + lanes(topo, "accel") for entry in await client.xrange(stream)]
    assert [json.loads(fields[b"routed"])["job"]["id"] for _, fields in routed] == ["fresh"]
    ids, statuses = await result_counts(client, topo)
    assert ids == {"late": 1, "odd": 1} and statuses == {"expired": 1, "failed": 1}
    assert await client.xlen(topo.jobs) == 0  # the copies were acked and deleted
