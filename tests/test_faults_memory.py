"""Redis refusing writes for a while: memory pressure, and a failover.

* Redis at ``maxmemory`` with ``noeviction`` refuses writes. Producers get a clear error
  (:class:`broker.errors.RedisOutOfMemory`, a ``Backpressure``); the roles keep running and
  retry what they could not write (a routing, a result) without counting it against the
  job; once memory is freed, work flows again and every job ends with exactly one result.
  The test runs its own redis-server with a small ``maxmemory`` and fills it for real.
* The roles' Redis turns replica (a failover elsewhere): blocked reads are cut short
  (``UNBLOCKED``) and writes refused (``READONLY``). The roles log it and keep trying;
  once it is a primary again, work flows.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError

from broker.client import Client
from broker.connection import connect
from broker.errors import Backpressure, RedisOutOfMemory
from broker.topology import Topology
from broker.wire import Job
from cli.embedded import EmbeddedRedis, free_port
from tests.conftest import FAST_ENV, Roles
from tests.helpers import eventually, lanes
from tests.test_faults_redis import all_done, assert_exactly_one_ok_result, launch, ready, slow_job


def embedding(job_id: str) -> Job:
    """A quick job only the gpu pool serves (so it waits for the gpu worker, wherever it is)."""
    return Job(id=job_id, model="minilm-l6", kind="embedding", max_tokens=0, texts=["t" * 40])


async def fill(client: aioredis.Redis, prefix: str) -> list[str]:
    """Write 1 MiB values until Redis refuses for want of memory; returns the keys written.

    The refused command's own 1 MiB argument counted at the check and is freed after it, which
    can bring Redis back under its limit; so the limit is then set a few MiB under what the data
    holds, and Redis stays full until the keys go.
    """
    keys: list[str] = []
    while True:
        key = f"{prefix}:filler:{len(keys)}"
        try:
            await client.set(key, b"x" * (1 << 20))
        except OutOfMemoryError:
            break
        keys.append(key)
        assert len(keys) < 1024, "Redis never ran out of memory"
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", used - (4 << 20))
    return keys


def logged(roles: Roles, role: str, *texts: str) -> bool:
    return any(all(t in line for t in texts)
               for p in roles.log_dir.glob(f"{role}-*.log") for line in p.read_text(errors="replace").splitlines())


async def test_redis_out_of_memory_refuses_producers_clearly_and_the_roles_ride_it_out(
        servers: list[EmbeddedRedis], make_roles: Callable[[str], Roles], tmp_path: Path, prefix: str) -> None:
    server = launch(servers, tmp_path / "data", port=free_port(), appendonly=False,
                    extra_args=("--maxmemory", "48mb"))
    topo = Topology(prefix)
    client = connect(server.url)
    roles = make_roles(server.url)
    policy = roles.start("policy", env=FAST_ENV)
    worker = roles.start("worker", "--pool", "gpu", "--grace", "5", env=FAST_ENV)
    procs = [policy, worker]
    try:
        assert (await client.config_get("maxmemory-policy"))["maxmemory-policy"] == "noeviction"
        await ready(client, topo, procs, gpu_workers=1)
        async with Client(server.url, prefix=prefix) as sdk:
            # Jobs running on the worker when memory runs out: their results cannot be written.
            running = [slow_job(f"running-{i}") for i in range(4)]
            await sdk.submit_many(running)

            async def started() -> bool:
                return sum([(await client.xpending(s, "workers"))["pending"] for s in lanes(topo, "gpu")]) == 4

            await eventually(started, timeout=15, what="the worker to run the slow jobs")
            # Jobs read by the policy worker, not yet routed: it is frozen while they arrive.
            os.kill(policy.pid, signal.SIGSTOP)
            try:
                queued = [embedding(f"queued-{i}") for i in range(10)]
                await sdk.submit_many(queued)
                filler = await fill(client, prefix)
            finally:
                os.kill(policy.pid, signal.SIGCONT)

            # (a) A producer is told, in one line, what is wrong and what to do.
            with pytest.raises(RedisOutOfMemory) as refused:
                await sdk.submit(embedding("refused"))
            message = str(refused.value)
            assert isinstance(refused.value, Backpressure) and refused.value.accepted == []
            assert "\n" not in message and "out of memory" in message and "maxmemory" in message, message

            # (b) The roles hit the refusal (routing; writing a finished job's result), say so, go on.
            async def both_refused() -> bool:
                assert all(p.poll() is None for p in procs), roles.logs()
                return (logged(roles, "policy", "could not route", "out of memory")
                        and logged(roles, "worker", "finishing job running-", "maxmemory"))

            await eventually(both_refused, timeout=20, what="both roles to meet the refusal")
            assert all(p.poll() is None for p in procs), roles.logs()

            # (c) Memory freed: the refused work goes through, and new work flows.
            await client.delete(*filler)
            later = [embedding(f"later-{i}") for i in range(5)]
            await sdk.submit_many(later)
            ids = [j.id for j in running + queued + later]
            await eventually(lambda: all_done(client, topo, ids), timeout=30, what="a result for every job")
        await assert_exactly_one_ok_result(client, topo, ids)
        # Retried writes cost no delivery: the slow jobs ran once, on their first delivery.
        attempts = {json.loads(raw)["id"]: json.loads(raw)["timing"]["attempt"]
                    for raw in await client.mget([topo.done(j.id) for j in running])}
        assert attempts == {j.id: 1 for j in running}
        assert all(p.poll() is None for p in procs), roles.logs()
    finally:
        await client.aclose()


async def test_the_roles_ride_out_their_redis_turning_replica_for_a_while(
        servers: list[EmbeddedRedis], make_roles: Callable[[str], Roles], tmp_path: Path, prefix: str) -> None:
    other = launch(servers, tmp_path / "other", port=free_port(), appendonly=False)
    server = launch(servers, tmp_path / "data", port=free_port(), appendonly=False)
    topo = Topology(prefix)
    client = connect(server.url)
    roles = make_roles(server.url)
    procs = [roles.start("policy", env=FAST_ENV), roles.start("worker", "--pool", "gpu", env=FAST_ENV)]
    try:
        await ready(client, topo, procs, gpu_workers=1)
        async with Client(server.url, prefix=prefix) as sdk:
            before = [embedding(f"before-{i}") for i in range(5)]
            await sdk.submit_many(before)
            await eventually(lambda: all_done(client, topo, [j.id for j in before]), what="results before")

            await client.replicaof("127.0.0.1", other.port)  # it takes the other node's (empty) data

            async def both_refused() -> bool:
                assert all(p.poll() is None for p in procs), roles.logs()
                return (logged(roles, "policy", "ReadOnlyError") and logged(roles, "worker", "ReadOnlyError")
                        and logged(roles, "worker", "Refused"))  # its blocked read, cut short

            await eventually(both_refused, timeout=20, what="both roles to meet the refusals")
            await client.replicaof("NO", "ONE")
            after = [embedding(f"after-{i}") for i in range(5)]
            await sdk.submit_many(after)
            ids = [j.id for j in after]
            await eventually(lambda: all_done(client, topo, ids), timeout=30, what="results after the failover")
        await assert_exactly_one_ok_result(client, topo, ids)
        assert all(p.poll() is None for p in procs), roles.logs()
    finally:
        await client.aclose()
