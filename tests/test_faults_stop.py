"""Every stop is bounded, whatever Redis does.

A role told to stop returns within its grace period plus a small bound even when Redis
is gone: SIGKILLed (connections refused) or SIGSTOPped (it accepts connections and never
answers, like a host that froze or a link that went dark). What a stopping role cannot
hand back in time stays pending and is taken over later, or expires: nothing waits on it.
Each test runs its own redis-server, since it is killed or frozen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from broker.client import LISTEN_BLOCK_MS, Client
from broker.connection import connect
from broker.errors import ResultTimeout
from broker.streams import STOP_TIMEOUT_S
from broker.topology import Topology
from cli.embedded import EmbeddedRedis, free_port
from tests.conftest import FAST_ENV, Roles
from tests.helpers import eventually, lanes
from tests.test_faults_redis import blocked_in_xread, launch, ready, slow_job

GRACE_S = 1.0
BLOCK_S = int(FAST_ENV["IB_BLOCK_MS"]) / 1000
SLACK_S = 1.5
"""Process exit and scheduling on two shared cores."""
WORKER_BOUND_S = max(GRACE_S, BLOCK_S + STOP_TIMEOUT_S) + STOP_TIMEOUT_S + SLACK_S
"""A worker leaves its read (block_ms + STOP_TIMEOUT_S at most) while its jobs get their grace,
then gives back what is left and removes its heartbeat (STOP_TIMEOUT_S at most)."""
POLICY_BOUND_S = BLOCK_S + 2 * STOP_TIMEOUT_S + SLACK_S
CLIENT_BOUND_S = LISTEN_BLOCK_MS / 1000 + 2 * STOP_TIMEOUT_S + SLACK_S


@pytest.fixture
def frozen() -> Iterator[list[EmbeddedRedis]]:
    """Servers a test SIGSTOPped: continued at teardown, so that they can be stopped."""
    stopped: list[EmbeddedRedis] = []
    yield stopped
    for server in stopped:
        if server.process is not None and server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)


def fail_redis(server: EmbeddedRedis, fault: str, frozen: list[EmbeddedRedis]) -> None:
    assert server.process is not None
    if fault == "killed":
        server.kill()
    else:
        frozen.append(server)
        os.kill(server.process.pid, signal.SIGSTOP)


async def exit_times(procs: dict[str, subprocess.Popen[bytes]], started: float, bound: float) -> dict[str, float]:
    """Seconds from ``started`` to each process's exit (as polled), waiting up to ``bound``."""
    took: dict[str, float] = {}

    async def all_gone() -> bool:
        for name, proc in procs.items():
            if name not in took and proc.poll() is not None:
                took[name] = time.monotonic() - started
        return len(took) == len(procs)

    with contextlib.suppress(AssertionError):
        await eventually(all_gone, timeout=bound, what="the roles to exit")
    return took


@pytest.mark.parametrize("fault", ["killed", "stopped"])
async def test_roles_stop_within_their_grace_when_redis_is_gone(
        servers: list[EmbeddedRedis], make_roles: Callable[[str], Roles], frozen: list[EmbeddedRedis],
        tmp_path: Path, prefix: str, fault: str) -> None:
    server = launch(servers, tmp_path / "data", port=free_port(), appendonly=False)
    topo = Topology(prefix)
    roles = make_roles(server.url)
    policy = roles.start("policy", env=FAST_ENV)
    worker = roles.start("worker", "--pool", "gpu", "--grace", str(GRACE_S), env=FAST_ENV)
    client = connect(server.url)
    try:
        await ready(client, topo, [policy, worker], gpu_workers=1)
        async with Client(server.url, prefix=prefix) as sdk:
            await sdk.submit_many([slow_job(f"slow-{i}") for i in range(4)])

        async def running() -> bool:
            return sum([(await client.xpending(s, "workers"))["pending"] for s in lanes(topo, "gpu")]) == 4

        await eventually(running, timeout=15, what="the worker to run the jobs")
    finally:
        await client.aclose()
    # The jobs run ~3 s: longer than the grace, so the worker must give them back, and cannot.
    fail_redis(server, fault, frozen)
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    policy.send_signal(signal.SIGTERM)
    took = await exit_times({"worker": worker, "policy": policy}, started, WORKER_BOUND_S + 10)
    assert took.get("worker", 99.0) <= WORKER_BOUND_S and took.get("policy", 99.0) <= POLICY_BOUND_S, took
    assert (worker.returncode, policy.returncode) == (0, 0), roles.logs()
    assert "stay pending" in roles.logs()


@pytest.mark.parametrize("fault", ["killed", "stopped"])
async def test_a_client_closes_within_its_bound_when_redis_is_gone(
        servers: list[EmbeddedRedis], frozen: list[EmbeddedRedis], tmp_path: Path, prefix: str, fault: str) -> None:
    server = launch(servers, tmp_path / "data", port=free_port(), appendonly=False)
    probe = connect(server.url)
    sdk = Client(server.url, prefix=prefix)
    # Three callers waiting on three reply streams: three listeners blocked in XREAD.
    waiting = [asyncio.create_task(sdk.result(f"never-{i}", timeout=60, reply_to=f"r{i}")) for i in range(3)]
    tokens = asyncio.create_task(anext(sdk.tokens("never-t", timeout=60)))

    async def listening() -> bool:
        return sum(c.get("cmd") == "xread" for c in await probe.client_list()) == 4

    try:
        await eventually(listening, timeout=10, what="the listeners to block")
        assert await blocked_in_xread(probe)
    finally:
        await probe.aclose()
    fail_redis(server, fault, frozen)
    # A caller's own timeout holds, although the reads it waits on never return.
    started = time.monotonic()
    with pytest.raises((ResultTimeout, RedisError)):
        await sdk.result("late", timeout=1.0, reply_to="r0")
    took = time.monotonic() - started
    assert took <= 1.0 + STOP_TIMEOUT_S + SLACK_S, f"a 1 s wait for a result took {took:.1f} s"
    started = time.monotonic()
    await asyncio.wait_for(sdk.aclose(), CLIENT_BOUND_S + 30)
    took = time.monotonic() - started
    assert took <= CLIENT_BOUND_S, f"closing the client took {took:.1f} s"
    for task in (*waiting, tokens):
        task.cancel()
    await asyncio.gather(*waiting, tokens, return_exceptions=True)
