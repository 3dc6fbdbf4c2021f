"""Fault injection on pool workers: SIGKILL, SIGSTOP/SIGCONT and SIGTERM on real processes.

Every role is a separate ``python -m cli`` process on the session's real redis-server
(see ``tests/conftest.py``); faults are real signals. Time is read on one host, so the
``time.time()`` of this test process and the timestamps the workers put into results
share a clock. Nothing sleeps where a condition can be awaited; the only sleeps are the
random points at which a fault lands and the poll interval of bounded loops.

Worker consumer names carry the pid (``worker-gpu-<host>-<pid>-<hex>``): that is how an
owner seen in ``XPENDING`` is matched to the process to signal.
"""

from __future__ import annotations

import asyncio
import collections
import random
import signal
import subprocess
import time
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from broker.client import Client
from broker.topology import WORKER_GROUP, Topology
from broker.wire import Job, Result, decode_result, decode_routed
from tests.conftest import FAST_ENV, Roles
from tests.deployments import ON_BOTH, streams, xlen_all, xrange_all
from tests.helpers import eventually, lane

# FAST_ENV's reliability timings, as numbers.
CLAIM_IDLE_S = int(FAST_ENV["IB_CLAIM_IDLE_MS"]) / 1000
CLAIM_INTERVAL_S = float(FAST_ENV["IB_CLAIM_INTERVAL_S"])
LEASE_PERIOD_S = CLAIM_IDLE_S / 3
"""Workers renew the leases of running jobs this often (a third of the claim idle time)."""
SLACK_S = 1.0
"""Scheduling slack on top of the protocol's own bounds (two cores, a handful of processes)."""


def completion(job_id: str, tokens: int, model: str = "llama-3.1-8b") -> Job:
    return Job(id=job_id, model=model, kind="completion", prompt="p", max_tokens=tokens)


def pid_of(consumer: str | bytes) -> int:
    """The pid in a worker's consumer name ``worker-<pool>-<host>-<pid>-<hex>``."""
    name = consumer.decode() if isinstance(consumer, bytes) else consumer
    return int(name.rsplit("-", 2)[1])


def start_worker(roles: Roles, *args: str, env: dict[str, str] = FAST_ENV) -> tuple[subprocess.Popen[bytes], Path]:
    """A gpu worker process and its log file (``Roles.start`` names logs ``<role>-<index>.log``)."""
    log = roles.log_dir / f"worker-{len(roles.procs)}.log"
    return roles.start("worker", "--pool", "gpu", *args, env=env), log


async def holders(client: aioredis.Redis, stream: str) -> dict[str, int]:
    """Consumer name -> entries it holds pending on ``stream`` (only consumers holding some)."""
    try:
        summary = await client.xpending(stream, WORKER_GROUP)
    except aioredis.ResponseError:  # the pool stream or group does not exist yet
        return {}
    return {c["name"].decode(): int(c["pending"]) for c in summary["consumers"] or []}


async def pending_rows(client: aioredis.Redis, stream: str, consumer: str | None = None) -> list[dict[str, Any]]:
    """``XPENDING stream workers - + 10000 [consumer]``: id, owner, idle ms, times delivered."""
    try:
        rows: list[dict[str, Any]] = await client.xpending_range(
            stream, WORKER_GROUP, min="-", max="+", count=10_000, consumername=consumer)
        return rows
    except aioredis.ResponseError:
        return []


async def results_on_stream(client: aioredis.Redis, topo: Topology) -> list[Result]:
    """The results on the default reply stream of every shard."""
    entries = await xrange_all(client, streams(topo, lambda t: t.reply("results")))
    return [decode_result(f[b"result"]) for _id, f in entries]


async def live_workers(client: aioredis.Redis, topo: Topology) -> set[int]:
    """Pids of gpu workers whose heartbeat is in the pool's heartbeat hash."""
    return {pid_of(name) for name in await client.hkeys(topo.heartbeats("gpu"))}  # type: ignore[misc]


async def drained(client: aioredis.Redis, *pool_streams: str) -> bool:
    """Nothing pending and nothing left on the pool streams (handled entries are XDEL'd)."""
    for stream in pool_streams:
        if await holders(client, stream) or await client.xlen(stream):
            return False
    return True


async def busy_workers(client: aioredis.Redis, pool_streams: list[str], pids: set[int], out: list[str]) -> bool:
    """Fill ``out`` with the consumer names of workers in ``pids`` holding entries; any?"""
    held = {name for stream in pool_streams for name in await holders(client, stream)}
    out[:] = sorted(name for name in held if pid_of(name) in pids)
    return bool(out)


async def all_done(client: aioredis.Redis, topo: Topology, job_ids: list[str]) -> bool:
    """Whether every job in ``job_ids`` has its outcome (done key, on the job's shard)."""
    return all([await client.exists(topo.of_job(j).done(j)) for j in job_ids])


class Kill(msgspec.Struct):
    at: float
    """time.time() just before SIGKILL (earlier than the death: conservative for latency)."""
    victim: str
    """Consumer name of the killed worker."""
    orphans: dict[str, int]
    """Job id -> delivery count of each entry the victim held when it died."""


# -- 1. SIGKILL x10 under load -------------------------------------------------------------

N_JOBS = 1000
N_KILLS = 10
KILL_SEED = 20260917


@ON_BOTH
async def test_ten_sigkills_under_1000_jobs_lose_nothing_and_reclaim_fast(
        roles: Roles, redis_url: str, prefix: str, shards: int, topo: Topology, client: aioredis.Redis) -> None:
    """Two gpu workers; one of them is SIGKILLed at a random point ten times and replaced.

    The jobs go in ten waves of 100, one wave before each kill, so every kill lands while
    work is flowing (the victim is a random worker among those holding jobs, i.e. mid-job).
    The next kill waits until the previous kill's orphans have their results: a job
    orphaned twice is a *suspect* (runs alone) and thrice is dead-lettered by design
    (max deliveries 3, a crash-poison job); this test is about plain takeover, so each job
    is orphaned at most once and the exact set of retried jobs is known.

    What the victim held when it died is read from ``XPENDING`` *after* it died (a dead
    process cannot change it, and takeover needs a full idle time), so attribution of
    each retry to its kill is exact, not a guess from timestamps. On the cluster, the
    workers hold entries of every shard's lane, and the kill orphans them wherever they are.
    """
    rng = random.Random(KILL_SEED)
    pools = streams(topo, lambda t: lane(t, "gpu"))  # completion jobs are of the standard class
    roles.start("policy", env=FAST_ENV)
    workers = [start_worker(roles, "--concurrency", "8")[0] for _ in range(2)]
    jobs = [completion(f"k-{i}", rng.randint(5, 60)) for i in range(N_JOBS)]
    wave = N_JOBS // N_KILLS
    kills: list[Kill] = []
    started = time.monotonic()

    async with Client(redis_url, prefix=prefix, shards=shards) as sdk:
        for k in range(N_KILLS):
            await sdk.submit_many(jobs[k * wave:(k + 1) * wave])
            await asyncio.sleep(rng.uniform(0.1, 0.7))  # the random point of this kill
            live = {w.pid: w for w in workers if w.poll() is None}
            busy: list[str] = []
            await eventually(partial(busy_workers, client, pools, set(live), busy), timeout=10,
                             what=f"a worker holding jobs before kill {k}")
            victim = rng.choice(busy)
            proc = live[pid_of(victim)]
            at = time.time()
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=5) == -signal.SIGKILL
            orphans: dict[str, int] = {}
            for pool in pools:
                for row in await pending_rows(client, pool, victim):
                    entry = await client.xrange(pool, row["message_id"], row["message_id"])
                    assert entry, f"orphaned entry {row['message_id']!r} is gone from {pool}"
                    orphans[decode_routed(entry[0][1][b"routed"]).job.id] = int(row["times_delivered"])
            kills.append(Kill(at=at, victim=victim, orphans=orphans))
            workers[workers.index(proc)] = start_worker(roles, "--concurrency", "8")[0]  # the supervisor
            await eventually(partial(all_done, client, topo, list(orphans)), timeout=15,
                             what=f"the jobs orphaned by kill {k} to finish")

        async def all_results() -> bool:
            return len({r.id for r in await results_on_stream(client, topo)}) >= N_JOBS

        await eventually(all_results, timeout=30, what="a result for every job")
        await eventually(lambda: drained(client, *pools), timeout=10, what="the gpu pool streams to drain")

    results = await results_on_stream(client, topo)
    counts = collections.Counter(r.id for r in results)
    assert set(counts) == {j.id for j in jobs}
    assert [i for i, n in counts.items() if n != 1] == []  # exactly one result per job
    assert await xlen_all(client, streams(topo, lambda t: t.dead)) == 0
    assert all(r.status == "ok" and r.timing is not None for r in results), [r for r in results if r.status != "ok"]

    # Every kill orphaned running jobs, and each job was orphaned at most once, at delivery 1.
    orphaned = {job_id: kill for kill in kills for job_id in kill.orphans}
    assert sum(len(k.orphans) for k in kills) == len(orphaned)
    assert all(k.orphans for k in kills), [len(k.orphans) for k in kills]
    assert all(n == 1 for k in kills for n in k.orphans.values())

    # The retried jobs are exactly the orphans; each ran once more, on another worker, and
    # was restarted within claim idle + claim interval + slack of the kill.
    by_id = {r.id: r for r in results}
    retried = {r.id for r in results if r.timing is not None and r.timing.attempt > 1}
    assert retried == set(orphaned)
    bound = CLAIM_IDLE_S + CLAIM_INTERVAL_S + SLACK_S
    latencies = []
    for job_id, kill in orphaned.items():
        r = by_id[job_id]
        assert r.timing is not None
        assert r.timing.attempt == kill.orphans[job_id] + 1, r
        assert r.worker != kill.victim
        latencies.append(r.timing.started_at - kill.at)
    assert max(latencies) <= bound, sorted(latencies)[-5:]
    print(f"{len(kills)} kills, orphans per kill {[len(k.orphans) for k in kills]}, reclaim latency "
          f"{min(latencies):.2f}..{max(latencies):.2f} s (bound {bound:.1f} s), run {time.monotonic() - started:.1f} s")


# -- 2. SIGSTOP past the idle time, a peer finishes, SIGCONT ---------------------------------

async def test_a_stopped_worker_is_fenced_after_a_peer_finishes_its_job(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    topo = Topology(prefix)
    pool = lane(topo, "gpu")  # completion jobs are of the standard class
    roles.start("policy", env=FAST_ENV)
    procs = dict([start_worker(roles) for _ in range(2)])

    async def both_up() -> bool:
        return await live_workers(client, topo) == {p.pid for p in procs}

    await eventually(both_up, timeout=15, what="both workers' heartbeats")
    job = completion("stalled", 150, model="llama-3.3-70b")  # ~3 s on the simulated device
    async with Client(redis_url, prefix=prefix) as sdk:
        await sdk.submit(job)
        owner: list[str] = []

        async def taken() -> bool:
            owner[:] = list(await holders(client, pool))
            return bool(owner)

        await eventually(taken, timeout=10, what="a worker to take the job")
        assert len(owner) == 1
        a_name = owner[0]
        a, a_log = next((p, log) for p, log in procs.items() if p.pid == pid_of(a_name))
        b = next(p for p in procs if p is not a)
        a.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        try:
            result = await sdk.result(job.id, timeout=20)
        finally:
            a.send_signal(signal.SIGCONT)

    # The peer took it over after the idle time and ran it to the end.
    assert result.status == "ok" and result.timing is not None
    assert result.worker != a_name and pid_of(result.worker or "") == b.pid
    assert result.timing.attempt == 2
    # Not before the idle time: A renewed its lease at most one lease period before the stop.
    assert result.timing.dequeued_at - stopped_at >= CLAIM_IDLE_S - LEASE_PERIOD_S - 0.15

    # The resumed worker notices that it lost the job (its lease renewal, or its fenced
    # completion) instead of publishing a second result.
    async def a_noticed() -> bool:
        text = a_log.read_text(errors="replace")
        return "lost the lease on" in text or "after a peer took it over" in text

    await eventually(a_noticed, timeout=10, what="the resumed worker to notice it lost the job")
    await eventually(lambda: drained(client, pool), timeout=10, what="the pool stream to drain")
    assert a.poll() is None  # a stall is not a crash: A carries on
    assert [r.id for r in await results_on_stream(client, topo)] == [job.id]
    done = await client.get(topo.done(job.id))
    assert done is not None and decode_result(done).worker == result.worker
    assert await client.xlen(topo.dead) == 0


# -- 3. SIGTERM a worker holding running jobs -------------------------------------------------

async def _fill_worker_then_start_peer(
        roles: Roles, client: aioredis.Redis, topo: Topology, sdk: Client, env: dict[str, str], grace: str,
) -> tuple[subprocess.Popen[bytes], str, Path, subprocess.Popen[bytes], list[Job]]:
    """Worker A (concurrency 10) takes 10 ~4 s jobs; then peer B starts and is up."""
    pool = lane(topo, "gpu")  # completion jobs are of the standard class
    a, a_log = start_worker(roles, "--concurrency", "10", "--grace", grace, env=env)
    jobs = [completion(f"term-{i}", 150, model="llama-3.3-70b") for i in range(10)]
    await sdk.submit_many(jobs)
    held: dict[str, int] = {}

    async def a_full() -> bool:
        held.clear()
        held.update(await holders(client, pool))
        return sum(held.values()) == 10

    await eventually(a_full, timeout=15, what="worker A to take all 10 jobs")
    assert len(held) == 1 and pid_of(next(iter(held))) == a.pid
    b, _ = start_worker(roles, "--concurrency", "10", "--grace", "30", env=env)

    async def b_up() -> bool:
        return b.pid in await live_workers(client, topo)

    await eventually(b_up, timeout=15, what="worker B's heartbeat")
    return a, next(iter(held)), a_log, b, jobs


async def _exit_of(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Await ``proc``'s exit; returns when it was seen (within the 20 ms poll)."""

    async def exited() -> bool:
        return proc.poll() is not None

    await eventually(exited, timeout=timeout, what=f"process {proc.pid} to exit")
    return time.time()


async def test_sigterm_gives_unfinished_jobs_back_at_once(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    """Grace (1 s) shorter than the jobs (~4 s): A exits 0 soon after it, and B restarts the
    jobs A gave back at once, not after the idle time. The idle time is 10 s here (not
    FAST_ENV's 1 s) so that "given back" and "taken over after idle" are far apart."""
    env = {**FAST_ENV, "IB_CLAIM_IDLE_MS": "10000"}
    grace = 1.0
    topo = Topology(prefix)
    roles.start("policy", env=env)
    async with Client(redis_url, prefix=prefix) as sdk:
        a, a_name, a_log, b, jobs = await _fill_worker_then_start_peer(roles, client, topo, sdk, env, str(grace))
        term_at = time.time()
        a.send_signal(signal.SIGTERM)
        exit_at = await _exit_of(a, timeout=15)
        results = await asyncio.gather(*(sdk.result(j.id, timeout=30) for j in jobs))

    assert a.returncode == 0
    assert exit_at - term_at <= grace + 1.5, f"A took {exit_at - term_at:.1f} s to stop with a {grace} s grace"
    assert "gave back 10 unfinished jobs" in a_log.read_text(errors="replace")
    counts = collections.Counter(r.id for r in await results_on_stream(client, topo))
    assert counts == {j.id: 1 for j in jobs}
    for r in results:
        assert r.status == "ok" and r.timing is not None, r
        assert pid_of(r.worker or "") == b.pid and r.worker != a_name, r
        assert r.timing.attempt == 2  # the give-back did not count a delivery; B's claim did
        # Given back: restarted within one claim pass (plus slack) of A's exit. Waiting out
        # the idle time instead would take ~10 s from A's last lease renewal.
        assert r.timing.started_at - exit_at <= CLAIM_INTERVAL_S + SLACK_S, r.timing
    assert await client.xlen(topo.dead) == 0


async def test_sigterm_with_enough_grace_finishes_running_jobs_on_the_same_worker(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    """Grace (15 s) longer than the jobs: A finishes all 10 itself, once each, and exits 0;
    B, running alongside with a 1 s claim idle time, takes nothing (A's leases hold)."""
    grace = 15.0
    topo = Topology(prefix)
    roles.start("policy", env=FAST_ENV)
    async with Client(redis_url, prefix=prefix) as sdk:
        a, a_name, a_log, _b, jobs = await _fill_worker_then_start_peer(roles, client, topo, sdk, FAST_ENV,
                                                                         str(grace))
        term_at = time.time()
        a.send_signal(signal.SIGTERM)
        exit_at = await _exit_of(a, timeout=grace + 5)
        results = await asyncio.gather(*(sdk.result(j.id, timeout=30) for j in jobs))

    assert a.returncode == 0
    assert exit_at - term_at < grace
    assert "gave back" not in a_log.read_text(errors="replace")
    counts = collections.Counter(r.id for r in await results_on_stream(client, topo))
    assert counts == {j.id: 1 for j in jobs}
    for r in results:
        assert r.status == "ok" and r.timing is not None, r
        assert r.worker == a_name and r.timing.attempt == 1, r
        assert r.timing.finished_at <= exit_at
    assert await client.xlen(topo.dead) == 0


# -- 4. Leases ---------------------------------------------------------------------------------

async def test_lease_keeps_a_long_job_on_its_live_worker_with_a_peer_waiting(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    """A ~4 s job (4x the 1 s claim idle time), two workers: the owner's lease renewals keep
    the entry's idle time under the claim idle time, so the peer never takes it over."""
    topo = Topology(prefix)
    pool = lane(topo, "gpu")  # completion jobs are of the standard class
    roles.start("policy", env=FAST_ENV)
    procs = [start_worker(roles)[0] for _ in range(2)]

    async def both_up() -> bool:
        return await live_workers(client, topo) == {p.pid for p in procs}

    await eventually(both_up, timeout=15, what="both workers' heartbeats")
    job = completion("leased", 200, model="llama-3.3-70b")
    samples: list[tuple[float, dict[str, Any]]] = []
    async with Client(redis_url, prefix=prefix) as sdk:
        await sdk.submit(job)

        async def taken() -> bool:
            return bool(await pending_rows(client, pool))

        await eventually(taken, timeout=10, what="a worker to take the job")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while await client.get(topo.done(job.id)) is None:
            assert loop.time() < deadline, "the job never finished"
            rows = await pending_rows(client, pool)
            if rows:
                assert len(rows) == 1
                samples.append((time.time(), rows[0]))
            await asyncio.sleep(0.05)
        result = await sdk.result(job.id, timeout=5)

    owners = {s["consumer"] for _t, s in samples}
    assert len(owners) == 1, owners  # never changed hands
    observed = samples[-1][0] - samples[0][0]
    assert observed > 2 * CLAIM_IDLE_S + 0.5, f"only watched the entry for {observed:.1f} s"
    assert {s["times_delivered"] for _t, s in samples} == {1}
    worst = max(int(s["time_since_delivered"]) for _t, s in samples)
    assert worst < CLAIM_IDLE_S * 1000, f"entry idle {worst} ms: the lease lapsed"

    assert result.status == "ok" and result.timing is not None and result.metrics is not None
    assert result.metrics.inference_time_ms > 3 * CLAIM_IDLE_S * 1000
    assert result.timing.attempt == 1
    assert (result.worker or "").encode() in owners
    assert [r.id for r in await results_on_stream(client, topo)] == [job.id]
    assert all(p.poll() is None for p in procs)  # the peer was there to take it, all along
    assert await client.xlen(topo.dead) == 0
