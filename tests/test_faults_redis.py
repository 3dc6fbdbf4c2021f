"""Fault injection on Redis itself: SIGKILL and restart, data loss, eviction, dropped connections.

Each test runs its own redis-server (never the session's), on a free loopback port with a
private directory, so it can be killed, flushed or restarted. The roles run as separate
processes and must ride out every fault without being restarted.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from broker.client import Client
from broker.connection import connect, wait_ready
from broker.errors import EmbeddedRedisError
from broker.topology import POLICY_GROUP, WORKER_GROUP, Topology
from broker.wire import Job
from cli.embedded import EmbeddedRedis, free_port
from tests.conftest import FAST_ENV, Roles, _start
from tests.helpers import eventually, lane, lanes, result_counts

LOSS = "Redis lost this deployment's data"


def launch(servers: list[EmbeddedRedis], directory: Path, **kwargs: object) -> EmbeddedRedis:
    server = _start(directory=directory, **kwargs)
    servers.append(server)
    return server


async def restart(servers: list[EmbeddedRedis], old: EmbeddedRedis, *, outage: float,
                  appendonly: bool | None = None) -> EmbeddedRedis:
    """SIGKILL ``old``; after ``outage`` s start a new server on its port and directory."""
    old.kill()
    await asyncio.sleep(outage)  # the length of the outage is the fault being injected
    new = EmbeddedRedis(port=old.port, directory=old.directory,
                        appendonly=old.appendonly if appendonly is None else appendonly,
                        extra_args=old.extra_args)
    servers.append(new)
    await asyncio.to_thread(new.start)
    # start() can return before the new server listens on a reused directory (see
    # test_restart_on_a_reused_directory_waits_for_the_new_server): wait for PING too.
    probe = connect(new.url)
    try:
        await wait_ready(probe, new.url, timeout=15)
    finally:
        await probe.aclose()
    return new


def jobs(n: int, tag: str) -> list[Job]:
    """Small jobs the policy sends to the GPU pool (standard-class completions, embeddings)."""
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(Job(id=f"{tag}-{i}", model="minilm-l6", kind="embedding", max_tokens=0, texts=["t" * 40]))
        else:
            out.append(Job(id=f"{tag}-{i}", model="llama-3.1-8b", kind="completion", prompt="p" * 200,
                           max_tokens=2 + i % 6))
    return out


async def ready(client: aioredis.Redis, topo: Topology, procs: list[subprocess.Popen[bytes]],
                gpu_workers: int) -> None:
    async def up() -> bool:
        assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
        return (await client.hlen(topo.policy_heartbeats) >= 1  # type: ignore[misc]
                and await client.hlen(topo.heartbeats("gpu")) >= gpu_workers)  # type: ignore[misc]

    await eventually(up, timeout=20, what="the roles to start")


async def all_done(client: aioredis.Redis, topo: Topology, ids: list[str]) -> bool:
    for start in range(0, len(ids), 500):
        if None in await client.mget([topo.done(i) for i in ids[start:start + 500]]):
            return False
    return True




async def submit_until_accepted(sdk: Client, chunk: list[Job], retried: set[str], timeout: float = 30) -> None:
    """Submit ``chunk``; while Redis is away, retry it whole under the same job ids."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await sdk.submit_many(chunk)
            return
        except (RedisError, OSError):
            # Some of the chunk may have gone in before the failure: resubmitting the same
            # ids is safe, routing is idempotent by job id.
            retried.update(j.id for j in chunk)
            assert loop.time() < deadline, "Redis did not come back"
            await asyncio.sleep(0.05)


async def assert_exactly_one_ok_result(client: aioredis.Redis, topo: Topology, ids: list[str]) -> None:
    got, statuses = await result_counts(client, topo)
    assert set(ids) <= set(got), f"no result for {sorted(set(ids) - set(got))[:10]}"
    assert [i for i in ids if got[i] != 1] == []
    assert statuses == Counter(ok=sum(got.values())), statuses
    assert await client.xlen(topo.dead) == 0


def policy_log(roles: Roles) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(roles.log_dir.glob("policy-*.log")))


# A killed process loses nothing with either setting: `everysec` still write()s the AOF
# before replying; only its fsync is deferred, which matters on power loss, not here.
@pytest.mark.parametrize("fsync", ["always", "everysec"])
async def test_redis_sigkilled_under_load_with_aof_keeps_every_acknowledged_job(
        servers: list[EmbeddedRedis], make_roles: Callable[[str], Roles], tmp_path: Path, prefix: str,
        fsync: str) -> None:
    server = launch(servers, tmp_path / "data", port=free_port(), appendonly=True,
                    extra_args=("--appendfsync", fsync))
    topo = Topology(prefix)
    client = connect(server.url)
    try:
        assert (await client.config_get("appendfsync"))["appendfsync"] == fsync
        roles = make_roles(server.url)
        procs = [roles.start("policy", env=FAST_ENV),
                 *(roles.start("worker", "--pool", "gpu", "--grace", "5", env=FAST_ENV) for _ in range(2))]
        pids = [p.pid for p in procs]
        await ready(client, topo, procs, gpu_workers=2)

        work = jobs(600, "aof")
        acked: list[str] = []  # ids whose submit returned: Redis acknowledged them
        retried: set[str] = set()
        halfway = asyncio.Event()

        async def produce() -> None:
            async with Client(server.url, prefix=prefix) as sdk:
                for start in range(0, len(work), 10):
                    chunk = work[start:start + 10]
                    await submit_until_accepted(sdk, chunk, retried)
                    acked.extend(j.id for j in chunk)
                    if len(acked) >= len(work) // 2:
                        halfway.set()
                    await asyncio.sleep(0.01)  # pacing: keep the load on across the outage

        async def crash() -> EmbeddedRedis:
            await halfway.wait()
            return await restart(servers, server, outage=0.5)

        _, server = await asyncio.gather(produce(), crash())
        assert len(acked) == len(work)
        await eventually(lambda: all_done(client, topo, acked), timeout=30,
                         what="a result for every acknowledged job")
        await assert_exactly_one_ok_result(client, topo, acked)
        # The roles rode it out: never restarted, still running.
        assert [p.pid for p in procs] == pids and all(p.poll() is None for p in procs)
        # AOF kept the epoch marker: a restart with its data is not reported as a loss.
        assert LOSS not in policy_log(roles)
        # Both pools drained and no entry stayed pending (restored PELs were worked off).
        for stream, group in ((topo.jobs, POLICY_GROUP), *((s, WORKER_GROUP) for s in lanes(topo, "gpu"))):
            info = {g["name"]: g for g in await client.xinfo_groups(stream)}
            assert info[group.encode()]["pending"] == 0
    finally:
        await client.aclose()


@pytest.mark.parametrize("fault", ["flushall", "restart_without_persistence"])
async def test_redis_that_comes_back_empty_is_detected_and_work_resumes(
        servers: list[EmbeddedRedis], make_roles: Callable[[str], Roles], tmp_path: Path, prefix: str,
        fault: str) -> None:
    server = launch(servers, tmp_path / "data", port=free_port(), appendonly=False)
    topo = Topology(prefix)
    client = connect(server.url)
    try:
        roles = make_roles(server.url)
        procs = [roles.start("policy", env=FAST_ENV),
                 roles.start("worker", "--pool", "gpu", "--grace", "5", env=FAST_ENV)]
        pids = [p.pid for p in procs]
        await ready(client, topo, procs, gpu_workers=1)
        before = [j.id for j in jobs(30, "before")]
        async with Client(server.url, prefix=prefix) as sdk:
            await sdk.submit_many(jobs(30, "before"))
        await eventually(lambda: all_done(client, topo, before), what="results before the fault")
        assert LOSS not in policy_log(roles)

        # Jobs running on the worker when the data goes: they are lost with it (no outcome),
        # but the worker must carry on.
        async with Client(server.url, prefix=prefix) as sdk:
            await sdk.submit_many([Job(id=f"inflight-{i}", model="llama-3.3-70b", kind="completion",
                                       prompt="p", max_tokens=100) for i in range(10)])

        async def running() -> bool:
            groups = {g["name"]: g for g in await client.xinfo_groups(lane(topo, "gpu"))}
            return groups[WORKER_GROUP.encode()]["pending"] > 0

        await eventually(running, what="jobs running on the worker")
        if fault == "flushall":
            await client.flushall()
        else:
            server = await restart(servers, server, outage=0.3)
        # Submitted at once, possibly before any role noticed: groups recreated at `$` rather
        # than 0 would skip these.
        after = [j.id for j in jobs(30, "after")]
        async with Client(server.url, prefix=prefix) as sdk:
            await sdk.submit_many(jobs(30, "after"))

            # Loudly: an ERROR line from the policy worker that says what was lost.
            await eventually(lambda: _logged(roles, LOSS), timeout=15,
                             what="the policy worker to report the loss")
            line = next(x for x in policy_log(roles).splitlines() if LOSS in x)
            assert " ERROR " in line and "gone without an outcome" in line

            # Groups are back on the ingress stream and on every pool stream.
            async def groups_back() -> bool:
                want = [(topo.jobs, POLICY_GROUP),
                        *((s, WORKER_GROUP) for pool in ("gpu", "accel") for s in lanes(topo, pool))]
                for stream, group in want:
                    try:
                        names = {g["name"] for g in await client.xinfo_groups(stream)}
                    except aioredis.ResponseError:
                        return False  # no such stream yet
                    if group.encode() not in names:
                        return False
                return True

            await eventually(groups_back, timeout=15, what="the consumer groups to be recreated")
            # New jobs flow again through the same processes.
            got = await asyncio.gather(*(sdk.result(i, timeout=20) for i in after))
        assert [r.status for r in got] == ["ok"] * len(after)
        await assert_exactly_one_ok_result(client, topo, after)
        assert [p.pid for p in procs] == pids and all(p.poll() is None for p in procs)
    finally:
        await client.aclose()


async def _logged(roles: Roles, text: str) -> bool:
    return text in policy_log(roles)


async def test_policy_worker_warns_when_redis_may_evict_streams(
        servers: list[EmbeddedRedis], make_roles: Callable[[str], Roles], tmp_path: Path, prefix: str) -> None:
    server = launch(servers, tmp_path / "data", port=free_port(),
                    extra_args=("--maxmemory-policy", "allkeys-lru"))
    roles = make_roles(server.url)
    policy = roles.start("policy", env=FAST_ENV)

    async def warned() -> bool:
        assert policy.poll() is None
        return "noeviction" in policy_log(roles)

    await eventually(warned, timeout=20, what="the eviction warning")
    line = next(x for x in policy_log(roles).splitlines() if "noeviction" in x)
    assert " WARNING " in line and "allkeys-lru" in line and "evict" in line
    assert policy.poll() is None  # a warning, not a refusal to run


async def test_dropped_connections_lose_and_duplicate_nothing(
        servers: list[EmbeddedRedis], make_roles: Callable[[str], Roles], tmp_path: Path, prefix: str) -> None:
    server = launch(servers, tmp_path / "data", port=free_port())
    topo = Topology(prefix)
    client = connect(server.url)
    try:
        roles = make_roles(server.url)
        procs = [roles.start("policy", env=FAST_ENV),
                 *(roles.start("worker", "--pool", "gpu", "--grace", "5", env=FAST_ENV) for _ in range(2))]
        pids = [p.pid for p in procs]
        await ready(client, topo, procs, gpu_workers=2)
        work = jobs(500, "drop")
        retried: set[str] = set()
        producing = True

        async def produce() -> None:
            nonlocal producing
            async with Client(server.url, prefix=prefix) as sdk:
                for start in range(0, len(work), 25):
                    await submit_until_accepted(sdk, work[start:start + 25], retried)
                    await asyncio.sleep(0.1)  # pacing: keep jobs flowing across the kills
            producing = False

        async def drop() -> list[int]:
            killed: list[int] = []
            killer = aioredis.Redis.from_url(server.url)  # SKIPME yes: its own link survives
            try:
                while producing or len(killed) < 5:
                    await asyncio.sleep(0.3)
                    killed.append(await killer.client_kill_filter(_type="normal"))
            finally:
                await killer.aclose()
            return killed

        _, killed = await asyncio.gather(produce(), drop())
        # Every kill cut live links (the roles', the producer's, this test's client).
        assert len(killed) >= 5 and all(n >= 1 for n in killed), killed
        ids = [j.id for j in work]
        await eventually(lambda: all_done(client, topo, ids), timeout=30, what="a result for every job")
        await assert_exactly_one_ok_result(client, topo, ids)
        assert [p.pid for p in procs] == pids and all(p.poll() is None for p in procs)
    finally:
        await client.aclose()


async def blocked_in_xread(client: aioredis.Redis) -> bool:
    """Some client (the SDK's result listener) is blocked in XREAD right now."""
    return any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in await client.client_list())


def slow_job(job_id: str) -> Job:
    """About three seconds on the simulated 70B model: long enough to fault Redis under it."""
    return Job(id=job_id, model="llama-3.3-70b", kind="completion", prompt="p", max_tokens=150)


@pytest.mark.parametrize("fault", ["dropped_connection", "redis_restart"])
async def test_a_caller_waiting_for_a_result_survives(
        fault: str, servers: list[EmbeddedRedis], make_roles: Callable[[str], Roles], tmp_path: Path,
        prefix: str) -> None:
    restarting = fault == "redis_restart"
    server = launch(servers, tmp_path / "data", port=free_port(), **({"appendonly": True} if restarting else {}))
    topo = Topology(prefix)
    client = connect(server.url)
    try:
        roles = make_roles(server.url)
        procs = [roles.start("policy", env=FAST_ENV), roles.start("worker", "--pool", "gpu", env=FAST_ENV)]
        await ready(client, topo, procs, gpu_workers=1)
        async with Client(server.url, prefix=prefix) as sdk:
            await sdk.submit(slow_job("slow"))
            waiter = asyncio.create_task(sdk.result("slow", timeout=12))
            await eventually(lambda: blocked_in_xread(client), timeout=5, what="the SDK listener to block")
            if restarting:
                await eventually(lambda: _pending(client, topo), what="the job to start")
                # Longer than any connection retry budget (5 retries, backoff capped at 2 s).
                server = await restart(servers, server, outage=5.0)
            else:
                assert await client.client_kill_filter(_type="normal") >= 1
            result = await waiter
        assert result.status == "ok"
        assert all(p.poll() is None for p in procs)
    finally:
        await client.aclose()


async def _pending(client: aioredis.Redis, topo: Topology) -> bool:
    return any([(await client.xpending(s, WORKER_GROUP))["pending"] for s in lanes(topo, "gpu")])


async def test_restart_on_a_reused_directory_waits_for_the_new_server(tmp_path: Path,
                                                                     servers: list[EmbeddedRedis]) -> None:
    first = launch(servers, tmp_path / "data", port=free_port())
    first.kill()
    second = EmbeddedRedis(port=first.port, directory=first.directory)
    servers.append(second)
    await asyncio.to_thread(second.start)
    # start() returned, so the server must accept a connection now: no retry, no wait.
    with socket.create_connection(("127.0.0.1", second.port), timeout=2):
        pass
    second.kill()
    # A server that cannot start (its port is taken) must be reported, not taken for ready.
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", first.port))
        blocker.listen()
        third = EmbeddedRedis(port=first.port, directory=first.directory)
        servers.append(third)
        with pytest.raises(EmbeddedRedisError):
            await asyncio.to_thread(third.start, 5.0)
