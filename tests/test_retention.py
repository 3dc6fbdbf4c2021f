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
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from broker.client import Client
from broker.config import load_config
from broker.connection import connect
from broker.dead import read_dead, replayable_job
from broker.errors import EmbeddedRedisError
from broker.janitor import Janitor
from broker.policy_worker import PolicyWorker
from broker.settings import Settings
from broker.streams import ensure_group
from broker.topology import POLICY_GROUP, WORKER_GROUP, Topology
from broker.wire import InvalidJob, Job, Result, decode_dead, json_encode
from cli.embedded import EmbeddedRedis, find_redis_server
from tests.conftest import FAST_ENV, ROOT, Roles
from tests.helpers import eventually, lanes

RETENTION_ENV = {**FAST_ENV, "IB_RESULT_TTL_S": "2", "IB_RESULTS_RETENTION_S": "1", "IB_JANITOR_S": "0.2"}

# Admission off: the floods below measure what 50k jobs leave behind, which needs every job
# to run through every stream (a refused one never reaches the pool's).
INSTANT_TOML = """
default_class = "standard"
default_pool = "gpu"

[classes.standard]
ttft_ms = 2000
on_unattainable = "best_effort"

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


# -- State that would otherwise grow with every role, reply stream and failure ------------------

STATE_ENV = {**FAST_ENV, "IB_HEARTBEAT_EXPIRY_S": "2", "IB_JANITOR_S": "0.2"}
"""Heartbeats expire after 2 s (the default is 60 s; 5 x the 0.2 s heartbeat is the floor)."""
KILLS = 100


@pytest.mark.timeout(120)
async def test_after_100_role_kills_the_heartbeats_name_only_live_roles(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    topo = Topology(prefix)
    policy = roles.start("policy", env=STATE_ENV)
    worker = roles.start("worker", "--pool", "gpu", env=STATE_ENV)

    async def beats(key: str) -> set[str]:
        return {name.decode() for name in await client.hkeys(key)}  # type: ignore[misc]

    async def up() -> bool:
        assert policy.poll() is None and worker.poll() is None, roles.logs()
        return (any(f"-{policy.pid}-" in n for n in await beats(topo.policy_heartbeats))
                and any(f"-{worker.pid}-" in n for n in await beats(topo.heartbeats("gpu"))))

    await eventually(up, timeout=30, what="the live roles' heartbeats")
    live = {key: await beats(key) for key in (topo.policy_heartbeats, topo.heartbeats("gpu"))}

    # 100 real roles (90 workers, 10 policy workers), each SIGKILLed after its first heartbeat.
    farm = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.role_farm", redis_url, prefix, str(KILLS),
        env={**os.environ, **STATE_ENV}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(farm.communicate(), 90)
    assert farm.returncode == 0, err.decode(errors="replace")[-3000:]
    killed = set(out.decode().split())
    assert len(killed) == KILLS
    done_at = time.monotonic()

    # Within heartbeat_expiry_s + janitor_s (+ slack) of the last kill, only the live roles
    # are left; theirs are never removed meanwhile.
    bound = float(STATE_ENV["IB_HEARTBEAT_EXPIRY_S"]) + float(STATE_ENV["IB_JANITOR_S"]) + 1.0

    async def only_live() -> bool:
        now = {key: await beats(key) for key in live}
        assert all(now[key] >= names for key, names in live.items()), ("a live role's heartbeat was removed", now)
        return now == live

    await eventually(only_live, timeout=bound + 10, what="the killed roles' heartbeats to expire")
    took = time.monotonic() - done_at
    assert took <= bound, f"the heartbeats of killed roles were removed after {took:.1f} s (bound {bound} s)"
    # And their consumers leave the groups (twice the claim idle time without a read).
    consumers_bound = 2 * int(STATE_ENV["IB_CLAIM_IDLE_MS"]) / 1000 + 1.0

    async def groups_clean() -> bool:
        names = {c["name"].decode() for stream, group in ((topo.jobs, POLICY_GROUP), (topo.pool("gpu"), WORKER_GROUP))
                 for c in await client.xinfo_consumers(stream, group)}
        return not names & killed

    await eventually(groups_clean, timeout=consumers_bound + 10, what="the killed roles' consumers to be removed")
    assert policy.poll() is None and worker.poll() is None


async def test_the_policy_forgets_workers_whose_heartbeats_expired(redis_url: str, prefix: str,
                                                                   client: aioredis.Redis) -> None:
    settings = Settings(redis_url=redis_url, prefix=prefix, heartbeat_s=0.2, heartbeat_expiry_s=1.0)
    topo = settings.topology
    redis = connect(redis_url)
    try:
        policy = PolicyWorker(redis, settings, load_config())
        await policy.janitor.start()
        now = time.time()

        def beat(age: float) -> bytes:
            return json_encode({"ts": now - age, "in_flight": 0, "capacity": 4, "seq": 1, "obs": []})

        await client.hset(topo.heartbeats("gpu"), mapping={"gone-1": beat(30), "gone-2": beat(1.5), "live": beat(0)})
        await client.hset(topo.policy_heartbeats, mapping={"gone-policy": beat(30), "garbled": b"{not json"})
        await policy.refresh()
        assert set(policy.fleet.seen) == {b"gone-1", b"gone-2", b"live"}
        await policy.janitor.sweep(time.time())
        assert await client.hkeys(topo.heartbeats("gpu")) == [b"live"]
        assert await client.hlen(topo.policy_heartbeats) == 0
        await policy.refresh()
        assert set(policy.fleet.seen) == {b"live"}
    finally:
        await redis.aclose()


async def test_an_abandoned_group_stops_holding_back_its_result_stream_which_then_goes(
        redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    """A group none of whose consumers read for ``results_group_idle_s`` while it held back
    trimming is destroyed (one without consumers, that long after the janitor first saw it);
    a caught-up live group is not, however idle; a consumer that comes back to a destroyed
    group gets it again. An empty stream that no group reads is deleted and its name
    forgotten."""
    settings = Settings(redis_url=redis_url, prefix=prefix, results_retention_s=0, results_group_idle_s=1)
    topo = settings.topology
    stream = topo.reply("r")
    janitor = Janitor(client, settings, {})
    await janitor.start()

    async def publish(n: int, tag: str) -> None:  # as COMPLETE does
        for i in range(n):
            result = Result(id=f"{tag}-{i}", status="ok", model="m", kind="chat", tenant="t")
            await client.xadd(stream, {"result": json_encode(result)})
        await client.sadd(topo.replies, "r")

    await ensure_group(client, stream, "gone")
    await ensure_group(client, stream, "never")  # created, never read: no consumer, no idle time
    await publish(5, "a")
    await client.xreadgroup("gone", "ghost", {stream: ">"}, count=2)  # reads two, acks nothing, leaves
    async with Client(redis_url, prefix=prefix) as sdk:
        live = sdk.results("live", reply_to="r")  # a live reader: caught up, then blocked
        slow = sdk.results("slow", reply_to="r")  # reads a batch, then stalls before acking it
        assert [(await anext(live)).id for _ in range(5)] == [f"a-{i}" for i in range(5)]
        assert (await anext(slow)).id == "a-0"
        reading = asyncio.create_task(anext(live))  # blocked: nothing new

        async def groups() -> set[str]:
            return {g["name"].decode() for g in await client.xinfo_groups(stream)}

        await janitor.sweep(time.time())  # nobody idle for 1 s yet: nothing destroyed, nothing trimmed
        assert await groups() == {"gone", "never", "live", "slow"} and await client.xlen(stream) == 5

        async def abandoned_gone() -> bool:
            await janitor.sweep(time.time())
            return await groups() == {"live"}

        await eventually(abandoned_gone, timeout=10, what="the abandoned groups to be destroyed")
        assert await client.xlen(stream) == 0  # trimmed: the live group had read and acked everything
        assert await client.sismember(topo.replies, "r")  # still read by a group: kept

        # The stalled consumer comes back: it finishes its batch, then its group is there again (at 0).
        assert [(await anext(slow)).id for _ in range(4)] == [f"a-{i}" for i in range(1, 5)]
        await publish(1, "b")
        assert (await anext(slow)).id == "b-0"
        assert (await reading).id == "b-0"
        await live.aclose()
        await slow.aclose()

    for group in await groups():
        await client.xgroup_destroy(stream, group)

    async def reaped() -> bool:
        await janitor.sweep(time.time())
        return not await client.exists(stream, topo.replies)

    await eventually(reaped, timeout=10, what="the emptied result stream to be deleted and forgotten")


async def test_dead_letters_are_cut_to_size_capped_in_number_and_expire(
        roles: Roles, prefix: str, client: aioredis.Redis) -> None:
    env = {**FAST_ENV, "IB_DEAD_PAYLOAD_BYTES": "1024", "IB_DEAD_MAX_LEN": "5", "IB_DEAD_RETENTION_S": "4",
           "IB_JANITOR_S": "0.2"}
    topo = Topology(prefix)
    roles.start("policy", env=env)
    # Eight jobs that fail validation (a field of the wrong type), each ~100 KB: the producer
    # gets a failed result, the dead letter keeps why and which job, and not the 100 KB.
    bodies = {f"bad-{i}": json.dumps({"id": f"bad-{i}", "model": "llama-3.1-8b", "kind": "completion",
                                      "prompt": "p" * 100_000, "max_tokens": "many"}).encode() for i in range(8)}
    for body in bodies.values():
        await client.xadd(topo.jobs, {"job": body})

    async def failed() -> bool:
        return await client.exists(*(topo.done(job_id) for job_id in bodies)) == len(bodies)

    await eventually(failed, timeout=20, what="a failed result for every bad job")

    async def capped() -> bool:
        return await client.xlen(topo.dead) == 5

    await eventually(capped, timeout=10, what="the dead-letter stream cut to dead_max_len")
    letters = [letter for _id, letter in await read_dead(client, topo)]
    assert [letter.job_id for letter in letters] == [f"bad-{i}" for i in range(3, 8)]  # the oldest went first
    for letter in letters:
        body = bodies[letter.job_id or ""]
        assert letter.reason == "invalid_job" and "max_tokens" in letter.error
        assert letter.payload == body[:1024] and letter.truncated == len(body) - 1024
    with pytest.raises(InvalidJob, match="cut to 1024 bytes"):
        replayable_job(letters[0], topo)

    async def expired() -> bool:
        return await client.xlen(topo.dead) == 0

    await eventually(expired, timeout=15, what="dead letters past dead_retention_s deleted")


SCALED_ENV = {**FAST_ENV, "IB_RESULT_TTL_S": "2", "IB_RESULTS_RETENTION_S": "1", "IB_RESULTS_GROUP_IDLE_S": "2",
              "IB_HEARTBEAT_EXPIRY_S": "2", "IB_DEAD_RETENTION_S": "2", "IB_DEAD_MAX_LEN": "20",
              "IB_DEAD_PAYLOAD_BYTES": "1024", "IB_JANITOR_S": "0.2"}
"""Every retention setting at its default scaled down: results 3600 s -> 1-2 s, abandoned groups
1 day -> 2 s, heartbeats 60 s -> 2 s, dead letters 7 days / 10,000 / 64 KiB -> 2 s / 20 / 1 KiB."""
REPLY_STREAMS = 20


async def run_workload(client: aioredis.Redis, url: str, prefix: str, tag: str, n: int) -> None:
    """``n`` jobs answered on 20 reply streams, 30 bad jobs (dead letters, ~20 KB each), a group
    abandoned half-read on one reply stream and one never read on another; returns once every
    job has its outcome."""
    topo = Topology(prefix)
    jobs = [Job(id=f"{tag}-{i}", model="m", kind="completion", prompt="p", max_tokens=1,
                reply_to=f"{tag}-r{i % REPLY_STREAMS}") for i in range(n)]
    bad = {f"{tag}-bad-{i}": json.dumps({"id": f"{tag}-bad-{i}", "model": "m", "kind": "completion",
                                         "prompt": "p" * 20_000, "max_tokens": "many", "reply_to": f"{tag}-bad"})
           for i in range(30)}
    await ensure_group(client, topo.reply(f"{tag}-r0"), "gone")
    await ensure_group(client, topo.reply(f"{tag}-r1"), "never")
    async with Client(url, prefix=prefix) as sdk:
        # Callers wait before the jobs go in: a result that comes first is found only by its
        # done key, which lives 2 s here.
        waits = [asyncio.create_task(sdk.result(j.id, timeout=60, reply_to=j.reply_to)) for j in jobs]
        waits += [asyncio.create_task(sdk.result(job_id, timeout=60, reply_to=f"{tag}-bad")) for job_id in bad]

        async def waiting() -> bool:
            return sum(len(w.futures) for w in sdk._waiters.values()) == len(waits)

        await eventually(waiting, what="the callers to wait")
        await sdk.submit_many(jobs)
        for body in bad.values():
            await client.xadd(topo.jobs, {"job": body})
        # A reader that takes ten results and is never seen again.
        await eventually(lambda: _has(client, topo.reply(f"{tag}-r0"), 10), what="results on the first stream")
        await client.xreadgroup("gone", "ghost", {topo.reply(f"{tag}-r0"): ">"}, count=10)
        results = await asyncio.gather(*waits)
    assert [r.status for r in results] == ["ok"] * n + ["failed"] * len(bad)


async def _has(client: aioredis.Redis, stream: str, n: int) -> bool:
    return await client.xlen(stream) >= n


async def inventory(client: aioredis.Redis, topo: Topology) -> dict[str, object]:
    """The deployment's keys (with their type and size), its heartbeats and group consumers."""
    keys: dict[str, object] = {}
    async for key in client.scan_iter(match=f"{topo.base}:*", count=10_000):
        kind = (await client.type(key)).decode()
        size = {"stream": client.xlen, "hash": client.hlen, "set": client.scard}.get(kind)
        keys[key.decode().removeprefix(topo.base + ":")] = (kind, await size(key) if size else None)  # type: ignore[operator]
    consumers = {stream: sorted(c["name"].decode() for c in await client.xinfo_consumers(stream, group))
                 for stream, group in ((topo.jobs, POLICY_GROUP), (topo.pool("gpu"), WORKER_GROUP))}
    return {"keys": keys, "consumers": consumers}


@pytest.mark.timeout(240)
async def test_memory_returns_to_its_baseline_after_a_drain_with_every_retention_scaled_down(
        tmp_path: Path, prefix: str, record_property: pytest.RecordProperty) -> None:
    config = tmp_path / "instant.toml"
    config.write_text(INSTANT_TOML)
    env = {**SCALED_ENV, "IB_CONFIG": str(config)}
    log_dir = tmp_path / "roles"
    log_dir.mkdir()
    topo = Topology(prefix)
    # No AOF, a server of its own: the measurement is of this deployment's data set.
    with EmbeddedRedis(appendonly=False) as server:
        roles = Roles(server.url, prefix, log_dir)
        client = aioredis.Redis.from_url(server.url)
        try:
            roles.start("policy", env=env)
            roles.start("worker", "--pool", "gpu", "--grace", "5", env=env)
            before: dict[str, object] = {}

            async def settled() -> bool:
                # Only what the live roles need: no reply stream, no per-job key, no letter
                # left, no heartbeat or consumer of a dead role. (`before` is empty at first.)
                now = await inventory(client, topo)
                keys = now["keys"]
                assert isinstance(keys, dict)
                quiet = not any(k.startswith(("done:", "routed:", "err:", "replies")) or "-r" in k or "-bad" in k
                                for k in keys) and keys.get("dead", ("stream", 0))[1] == 0
                return quiet and (not before or now == before)

            # Warm up (scripts loaded, every kind of key made once), drain: the baseline.
            await run_workload(client, server.url, prefix, "warm", 200)
            await eventually(settled, timeout=30, what="the warm-up drained")
            before.update(await inventory(client, topo))
            base = await settled_memory(client)

            # A worker that dies mid-run, as well.
            doomed = roles.start("worker", "--pool", "gpu", "--grace", "5", env=env)

            async def doomed_up() -> bool:
                return any(f"-{doomed.pid}-".encode() in n for n in await client.hkeys(topo.heartbeats("gpu")))

            await eventually(doomed_up, timeout=30, what="the second worker's heartbeat")
            run = asyncio.create_task(run_workload(client, server.url, prefix, "run", 2_000))
            await eventually(lambda: _has(client, topo.reply("run-r0"), 1), timeout=30, what="the run to start")
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            await run
            started = time.monotonic()
            await eventually(settled, timeout=30, what="everything the run left to be trimmed, expired or removed")
            drained = time.monotonic() - started
            after = await settled_memory(client)
            growth, data_growth = after[0] - base[0], after[1] - base[1]
            summary = (f"after 2,000 jobs on {REPLY_STREAMS} reply streams, 30 dead letters, an abandoned group "
                       f"and a killed worker: settled {drained:.1f} s after the last outcome; used_memory "
                       f"{base[0]} -> {after[0]} ({growth:+d} bytes; without client connections {data_growth:+d})")
            print(summary)
            record_property("retention_scaled", summary)
            assert data_growth < DATA_BOUND, summary
            assert growth < MEMORY_BOUND, summary
        except BaseException:
            print(roles.logs())
            raise
        finally:
            await client.aclose()
            roles.stop_all()
