"""Bounded memory: what a finished job leaves behind in Redis, and what housekeeping removes.

* 50,000 jobs through a live stack leave every stream empty, nothing pending, no per-job
  keys (their TTL ran out) and ``used_memory`` back near where it started. The device
  answers at once (profile ``instant``), so the run measures the broker, not a simulation.
  It runs on a Redis of its own: the session's server is shared with other tests, whose
  keys would move ``used_memory`` under the measurement.
* Result retention never trims a result some consumer group has not read or not acked.
* Consumers of dead processes are removed from their group, but only once they hold no
  pending entries.
* An entry trimmed (or deleted) while pending becomes a dead letter ``trimmed`` rather
  than vanishing (needs Redis 7.0+: XAUTOCLAIM reports deleted ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from broker.client import Client
from broker.embedded import EmbeddedRedis, find_redis_server
from broker.errors import EmbeddedRedisError
from broker.janitor import Janitor
from broker.settings import Settings
from broker.streams import ensure_group
from broker.topology import POLICY_GROUP, WORKER_GROUP, Topology
from broker.wire import Job, decode_dead
from tests.conftest import FAST_ENV, Roles
from tests.helpers import eventually, lanes

RETENTION_ENV = {**FAST_ENV, "IB_RESULT_TTL_S": "2", "IB_RESULTS_RETENTION_S": "1", "IB_JANITOR_S": "0.2"}

INSTANT_TOML = """
default_class = "standard"
default_pool = "gpu"

[classes.standard]
ttft_ms = 2000

[pools.gpu]
models = ["m"]
profile = "instant"
concurrency = 256
"""

N = 50_000
WARMUP = 5_000
"""Enough to open every connection the roles will use (each worker: one per concurrent job)."""
MEMORY_BOUND = 2 * 1024 * 1024
"""Allowed growth of ``used_memory`` after 50k jobs, in bytes. Measured on Redis 7.0.15 (2 cores):
baseline ~2.9 MB (an empty server is ~0.9 MB; ~520 idle client connections add ~0.9 MB, since
each worker opens a connection per concurrent job), peak 56-67 MB, after the drain -510 KB to
+370 KB of the baseline; the spread is connections opened or closed between the two readings. 2 MB is headroom for
that, and still catches a leak of ~40 bytes per job."""
DATA_BOUND = 512 * 1024
"""The same, less ``mem_clients_normal``: measured +8 KB to +71 KB (the latter with 74 more
connections open than at the baseline: each also costs ~1 KB outside that figure). 512 KB
catches a leak of ~10 bytes per job."""


def instant(job_id: str) -> Job:
    return Job(id=job_id, model="m", kind="completion", prompt="p", max_tokens=1)


async def redis_version(client: aioredis.Redis) -> tuple[int, ...]:
    info = await client.info("server")
    return tuple(int(x) for x in str(info["redis_version"]).split(".")[:2])


async def pending(client: aioredis.Redis, stream: str, group: str) -> int:
    try:
        return int((await client.xpending(stream, group))["pending"])
    except aioredis.ResponseError:
        return 0  # no such stream or group


async def count_keys(client: aioredis.Redis, pattern: str) -> int:
    return len([k async for k in client.scan_iter(match=pattern, count=10_000)])


async def footprint(client: aioredis.Redis, topo: Topology) -> dict[str, int]:
    """What the deployment holds in Redis now."""
    streams = {"jobs": [topo.jobs], "pool": lanes(topo, "gpu"), "results": [topo.reply("results")],
               "dead": [topo.dead]}
    out = {f"xlen_{name}": sum([int(await client.xlen(key)) for key in keys]) for name, keys in streams.items()}
    out |= {
        "pending_jobs": await pending(client, topo.jobs, POLICY_GROUP),
        "pending_pool": sum([await pending(client, stream, WORKER_GROUP) for stream in lanes(topo, "gpu")]),
        "pending_results": await pending(client, topo.reply("results"), "audit"),
        "done_keys": await count_keys(client, f"{topo.base}:done:*"),
        "routed_keys": await count_keys(client, f"{topo.base}:routed:*"),
        "dbsize": int(await client.dbsize()),
        "used_memory": int((await client.info("memory"))["used_memory"]),
        "clients": int((await client.info("clients"))["connected_clients"]),
    }
    return out


async def memory(client: aioredis.Redis) -> tuple[int, int]:
    """``used_memory``, and the part of it not held by client connections (their buffers and state)."""
    info = await client.info("memory")
    return int(info["used_memory"]), int(info["used_memory"]) - int(info["mem_clients_normal"])


async def settled_memory(client: aioredis.Redis, timeout: float = 20.0) -> tuple[int, int]:
    """:func:`memory` once it holds still: Redis shrinks idle clients' buffers lazily (clientsCron)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = await memory(client)
    while loop.time() < deadline:
        await asyncio.sleep(1.0)
        now = await memory(client)
        if abs(now[0] - last[0]) < 32 * 1024:
            return now
        last = now
    return last


def quiet(f: dict[str, int]) -> bool:
    return all(v == 0 for k, v in f.items() if k.startswith(("xlen_", "pending_", "done_", "routed_")))


@pytest.mark.timeout(240)
async def test_50k_jobs_leave_streams_and_memory_near_their_starting_point(
        tmp_path: Path, prefix: str, record_property: pytest.RecordProperty) -> None:
    config = tmp_path / "instant.toml"
    config.write_text(INSTANT_TOML)
    env = {**RETENTION_ENV, "IB_CONFIG": str(config)}
    log_dir = tmp_path / "roles"
    log_dir.mkdir()
    # No AOF: the measurement is of the data set, not of append-only buffers or a rewrite.
    with EmbeddedRedis(appendonly=False) as server:
        roles = Roles(server.url, prefix, log_dir)
        client = aioredis.Redis.from_url(server.url)
        topo = Topology(prefix)
        sdk = Client(server.url, prefix=prefix)
        seen: set[str] = set()
        reads = 0
        reader: asyncio.Task[None] | None = None
        sampler: asyncio.Task[None] | None = None
        try:
            roles.start("policy", env=env)
            workers = [roles.start("worker", "--pool", "gpu", "--grace", "5", env=env) for _ in range(2)]

            async def read_results() -> None:
                # A real consumer: it keeps reading, so the last result it got is acked too.
                nonlocal reads
                async for result in sdk.results("audit", "c1", count=500):
                    assert result.status == "ok", result
                    seen.add(result.id)
                    reads += 1

            reader = asyncio.create_task(read_results())

            async def all_seen(n: int) -> bool:
                assert not reader.done() or reader.exception() is None, reader.exception()
                return len(seen) >= n

            async def settled() -> bool:
                return quiet(await footprint(client, topo))

            # Warm up (scripts loaded, groups and consumers created), then let it all drain.
            await sdk.submit_many([instant(f"warm-{i}") for i in range(WARMUP)])
            await eventually(lambda: all_seen(WARMUP), timeout=30, what="warm-up results")
            await eventually(settled, timeout=30, what="warm-up drained")
            before = await footprint(client, topo)
            before["used_memory"], before["data_memory"] = await settled_memory(client)

            peak = {k: v for k, v in before.items() if k != "data_memory"}
            pools_empty_after: list[float] = []

            async def sample() -> None:
                while True:
                    now = await footprint(client, topo)
                    for k, v in now.items():
                        peak[k] = max(peak[k], v)
                    if peak["xlen_jobs"] and not pools_empty_after and not (
                            now["xlen_jobs"] or now["xlen_pool"] or now["pending_pool"]):
                        pools_empty_after.append(time.monotonic() - started)
                    await asyncio.sleep(0.25)

            sampler = asyncio.create_task(sample())
            started = time.monotonic()
            for i in range(0, N, 5_000):
                await sdk.submit_many([instant(f"job-{j}") for j in range(i, i + 5_000)], chunk=1_000)
            submitted = time.monotonic() - started
            await eventually(lambda: all_seen(WARMUP + N), timeout=150, what=f"{N} results")
            processed = time.monotonic() - started
            sampler.cancel()
            await eventually(settled, timeout=30, what="streams trimmed and per-job keys expired")
            drained = time.monotonic() - started
            after = await footprint(client, topo)
            after["used_memory"], after["data_memory"] = await settled_memory(client)

            growth = after["used_memory"] - before["used_memory"]
            data_growth = after["data_memory"] - before["data_memory"]
            workers_done = f"{pools_empty_after[0]:.1f}" if pools_empty_after else "?"
            summary = (f"{N} jobs: submitted in {submitted:.1f} s, every job run after ~{workers_done} s, "
                       f"all results read (one XACK each) after {processed:.1f} s, drained after {drained:.1f} s; "
                       f"used_memory "
                       f"{before['used_memory']} -> peak {peak['used_memory']} -> {after['used_memory']} "
                       f"({growth:+d} bytes; without client connections {data_growth:+d}); "
                       f"dbsize {before['dbsize']} -> peak {peak['dbsize']} -> "
                       f"{after['dbsize']}; clients {before['clients']} -> peak {peak['clients']} -> "
                       f"{after['clients']}; "
                       f"peak lengths jobs {peak['xlen_jobs']} pool {peak['xlen_pool']} "
                       f"results {peak['xlen_results']}")
            print(summary)
            record_property("retention", summary)

            assert seen >= {f"job-{i}" for i in range(N)}
            assert reads == WARMUP + N  # one result per job, no duplicates
            assert after["xlen_dead"] == 0
            assert after["dbsize"] == before["dbsize"], (before, after)
            assert growth < MEMORY_BOUND, summary
            assert data_growth < DATA_BOUND, summary
            # Consumers: the live roles and the one result reader, no more.
            assert len(await client.xinfo_consumers(topo.pool("gpu"), WORKER_GROUP)) <= len(workers)
            assert len(await client.xinfo_consumers(topo.jobs, POLICY_GROUP)) <= 1
            assert all(p.poll() is None for p in roles.procs), roles.logs()
        except BaseException:
            print(roles.logs())
            raise
        finally:
            for task in (reader, sampler):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            await sdk.aclose()
            await client.aclose()
            roles.stop_all()


async def test_retention_never_trims_results_a_group_has_not_read_or_acked(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    topo = Topology(prefix)
    stream = topo.reply("results")
    # Groups first, at 0: every result is owed to both.
    await ensure_group(client, stream, "slow")
    await ensure_group(client, stream, "partial")
    roles.start("policy", env=RETENTION_ENV)
    roles.start("worker", "--pool", "gpu", "--grace", "5", env=RETENTION_ENV)
    jobs = [Job(id=f"keep-{i}", model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=1)
            for i in range(20)]
    async with Client(redis_url, prefix=prefix) as sdk:
        await sdk.submit_many(jobs)
        for job in jobs:
            assert (await sdk.result(job.id, timeout=30)).status == "ok"
    ids = [e[0] for e in await client.xrange(stream)]
    assert len(ids) == 20

    # "partial" reads everything and acks the first 5 and last 5: 5..14 stay pending.
    got = await client.xreadgroup("partial", "p1", {stream: ">"}, count=100)
    assert [e[0] for e in got[0][1]] == ids
    await client.xack(stream, "partial", *ids[:5], *ids[15:])

    # Past the 1 s retention, many janitor rounds: "slow" has read nothing, so all stay.
    await asyncio.sleep(2.5)
    assert [e[0] for e in await client.xrange(stream)] == ids

    # "slow" reads and acks all: the floor is now partial's oldest pending entry.
    got = await client.xreadgroup("slow", "s1", {stream: ">"}, count=100)
    await client.xack(stream, "slow", *[e[0] for e in got[0][1]])

    async def trimmed_to(n: int) -> bool:
        return await client.xlen(stream) == n

    await eventually(lambda: trimmed_to(15), timeout=10, what="results below partial's pending entries trimmed")
    await asyncio.sleep(1.0)  # and no further
    assert [e[0] for e in await client.xrange(stream)] == ids[5:]

    # Acked by everyone and older than the retention: trimmed.
    await client.xack(stream, "partial", *ids[5:15])
    await eventually(lambda: trimmed_to(0), timeout=10, what="fully acked results trimmed")


async def _consumers(client: aioredis.Redis, stream: str, group: str = WORKER_GROUP) -> dict[str, dict]:
    return {c["name"].decode(): c for c in await client.xinfo_consumers(stream, group)}


async def test_dead_consumers_are_removed_once_they_hold_nothing(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    topo = Topology(prefix)
    gpu, accel = topo.pool("gpu"), topo.pool("accel")
    idle_limit = 2 * int(FAST_ENV["IB_CLAIM_IDLE_MS"]) / 1000
    roles.start("policy", env=FAST_ENV)
    doomed = roles.start("worker", "--pool", "gpu", "--grace", "5", env=FAST_ENV)

    async def joined() -> bool:
        return await client.exists(gpu) and any(f"-{doomed.pid}-" in n for n in await _consumers(client, gpu))

    await eventually(joined, timeout=30, what="the worker reading the gpu pool")
    (doomed_name,) = [n for n in await _consumers(client, gpu) if f"-{doomed.pid}-" in n]

    # A consumer of a dead process that still holds an entry: nobody serves the accel pool,
    # so nothing takes it over.
    await ensure_group(client, accel, WORKER_GROUP)  # (as the policy worker does at start)
    await client.xadd(accel, {"routed": b"held by a ghost"})
    await client.xreadgroup(WORKER_GROUP, "ghost", {accel: ">"}, count=1)

    doomed.send_signal(signal.SIGKILL)  # idle: it holds nothing
    doomed.wait()
    killed = time.monotonic()

    async def doomed_gone() -> bool:
        return doomed_name not in await _consumers(client, gpu)

    await eventually(doomed_gone, timeout=15, what="the killed worker's consumer removed")
    # Not before it was idle for twice the claim idle time (its last read was <= 0.2 s before the kill).
    assert time.monotonic() - killed >= idle_limit - 0.3

    # The ghost is far past the idle limit too, but holds an entry: it stays.
    ghost = (await _consumers(client, accel))["ghost"]
    assert ghost["pending"] == 1 and ghost["idle"] > idle_limit * 1000
    await asyncio.sleep(0.6)  # three more janitor rounds
    assert "ghost" in await _consumers(client, accel)

    # Once its entry is settled, it goes.
    (entry_id,) = [e[0] for e in await client.xrange(accel)]
    await client.xack(accel, WORKER_GROUP, entry_id)

    async def ghost_gone() -> bool:
        return "ghost" not in await _consumers(client, accel)

    await eventually(ghost_gone, timeout=10, what="the ghost consumer removed after its entry was acked")


def _server_version() -> tuple[int, ...]:
    try:
        out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError, EmbeddedRedisError):
        return (0, 0)
    found = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else (0, 0)


BEFORE_7_2 = _server_version() < (7, 2)


async def test_a_live_idle_worker_keeps_its_consumer(roles: Roles, prefix: str, client: aioredis.Redis) -> None:
    topo = Topology(prefix)
    gpu = topo.pool("gpu")
    roles.start("policy", env=FAST_ENV)
    worker = roles.start("worker", "--pool", "gpu", "--grace", "5", env=FAST_ENV)

    async def joined() -> bool:
        return await client.exists(gpu) and any(f"-{worker.pid}-" in n for n in await _consumers(client, gpu))

    await eventually(joined, timeout=30, what="the worker reading the gpu pool")
    # Idle (no jobs) for well past 2 x claim idle while the janitor sweeps every 0.2 s.
    loop = asyncio.get_running_loop()
    until = loop.time() + 3 * int(FAST_ENV["IB_CLAIM_IDLE_MS"]) / 1000
    while loop.time() < until:
        assert any(f"-{worker.pid}-" in n for n in await _consumers(client, gpu)), "live consumer removed"
        await asyncio.sleep(0.05)
    assert worker.poll() is None


async def test_janitor_never_deletes_a_consumer_that_took_an_entry_meanwhile(
        prefix: str, redis_url: str, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(redis_url=redis_url, prefix=prefix, claim_idle_ms=300, block_ms=200)
    stream = settings.topology.pool("gpu")
    await ensure_group(client, stream, WORKER_GROUP)
    await client.xgroup_createconsumer(stream, WORKER_GROUP, "quiet-worker")
    await asyncio.sleep(0.7)  # idle past 2 x claim_idle (on Redis 7.0 a blocked read does not reset it)
    await client.xadd(stream, {"routed": b"a job"})
    real = client.xinfo_consumers

    async def racing(name: str, groupname: str) -> object:
        seen = await real(name, groupname)
        # The worker's blocked XREADGROUP is served right after the janitor looked.
        await client.xreadgroup(WORKER_GROUP, "quiet-worker", {stream: ">"}, count=1)
        return seen

    monkeypatch.setattr(client, "xinfo_consumers", racing)
    heartbeats = settings.topology.heartbeats("gpu")
    await Janitor(client, settings, {stream: (WORKER_GROUP, heartbeats)}).remove_dead_consumers(time.time())
    assert await pending(client, stream, WORKER_GROUP) == 1, "a delivered job left the PEL unacked: it is lost"


ROUTED = {"job": {"id": "trim-me", "model": "llama-3.1-8b", "kind": "completion", "prompt": "p", "max_tokens": 1},
          "route": {"pool": "gpu", "slo": "standard", "reason": "test", "routed_at": 1.7e9, "ttft_target_ms": 2000.0},
          "created_at": 1.7e9}
JOB = ROUTED["job"]


@pytest.mark.parametrize("where", [
    "ingress",
    "pool",
])
async def test_an_entry_trimmed_while_pending_becomes_a_dead_letter(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis, where: str) -> None:
    if await redis_version(client) < (7, 0):
        pytest.skip("Redis < 7.0: XAUTOCLAIM does not report deleted entries")
    topo = Topology(prefix)
    stream, group = (topo.jobs, POLICY_GROUP) if where == "ingress" else (topo.pool("gpu"), WORKER_GROUP)
    await ensure_group(client, stream, group)
    payload = {"job": json.dumps(JOB)} if where == "ingress" else {"routed": json.dumps(ROUTED)}
    entry_id = (await client.xadd(stream, payload)).decode()
    # A consumer takes it and dies; then the stream is trimmed under it (MAXLEN, as a blind
    # retention policy would).
    await client.xreadgroup(group, "ghost", {stream: ">"}, count=1)
    assert await client.xtrim(stream, maxlen=0, approximate=False) == 1
    assert await pending(client, stream, group) == 1

    roles.start("policy" if where == "ingress" else "worker", *(() if where == "ingress" else ("--pool", "gpu")),
                env=FAST_ENV)

    async def dead_lettered() -> bool:
        return any(decode_dead(f[b"dead"]).entry_id == entry_id for _i, f in await client.xrange(topo.dead))

    await eventually(dead_lettered, timeout=10, what=f"a dead letter for the trimmed {where} entry")
    (letter,) = [decode_dead(f[b"dead"]) for _i, f in await client.xrange(topo.dead)]
    assert letter.reason == "trimmed" and letter.stream == stream
    assert await pending(client, stream, group) == 0
