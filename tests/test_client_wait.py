"""How the SDK waits for a result: from positions of the server's clock, re-checking the done
key, with a listener that outlives bad entries and Redis errors. Real Redis; the roles, where
a test needs them, as real processes."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as aioredis

from broker.client import Client
from broker.topology import Topology
from broker.wire import Job, Result, json_encode
from cli.stack import wait_for_roles
from tests.conftest import FAST_ENV, Roles
from tests.helpers import eventually

SKEW_S = 3.0


def clock_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on this process' clock (the SDK's, not Redis' nor the roles') runs ``SKEW_S`` ahead."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + SKEW_S)


def result(job_id: str) -> bytes:
    return json_encode(Result(id=job_id, status="ok", model="m", kind="completion", tenant="default", output="hi"))


async def listening(client: aioredis.Redis) -> bool:
    """Some connection is blocked in XREAD: a waiter is registered and its listener reads."""
    return any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in await client.client_list())


async def test_a_result_on_the_stream_is_found_with_the_client_clock_ahead_of_redis(
        client: aioredis.Redis, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The listener started from an id made of the client's clock: 3 s in Redis' future, so
    # it skipped every result of the next 3 s.
    clock_ahead(monkeypatch)
    topo = Topology(prefix)
    async with Client(redis_url, prefix=prefix) as sdk:
        waiting = asyncio.create_task(sdk.result("j1", timeout=10))
        await eventually(lambda: listening(client), what="the SDK's listener")
        await client.xadd(topo.reply("results"), {"result": result("j1")})  # the stream only, no done key
        got = await asyncio.wait_for(waiting, SKEW_S - 1)  # before the skewed position catches up
    assert got.id == "j1" and got.output == "hi"


async def test_a_result_only_in_the_done_key_is_found_while_waiting(
        client: aioredis.Redis, redis_url: str, prefix: str) -> None:
    # Whatever the listener missed (a trimmed stream, a reply key it cannot read), the done
    # key is re-checked while waiting.
    topo = Topology(prefix)
    async with Client(redis_url, prefix=prefix) as sdk:
        waiting = asyncio.create_task(sdk.result("j2", timeout=10))
        await eventually(lambda: listening(client), what="the SDK's listener")
        await client.set(topo.done("j2"), result("j2"))
        got = await asyncio.wait_for(waiting, 5)
    assert got.id == "j2"


async def test_the_listener_skips_bad_entries_and_outlives_errors_from_where_it_was(
        client: aioredis.Redis, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    # It died on any error but a lost connection (an undecodable entry, a reply key that is
    # no stream), and the next wait started it again from its first position.
    caplog.set_level(logging.WARNING, "inference_broker.client")
    topo = Topology(prefix)
    stream = topo.reply("results")

    def logged(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records if r.name == "inference_broker.client")

    async with Client(redis_url, prefix=prefix) as sdk:
        first = asyncio.create_task(sdk.result("j3", timeout=10))
        await eventually(lambda: listening(client), what="the SDK's listener")
        bad = (await client.xadd(stream, {"result": b"\x00 not a result"})).decode()
        await client.xadd(stream, {"result": result("j3")})
        assert (await asyncio.wait_for(first, 5)).id == "j3"
        assert logged(bad) == 1

        await client.delete(stream)
        await client.set(stream, b"not a stream")  # every read fails now

        async def failing() -> bool:
            return logged("WRONGTYPE") > 0

        second = asyncio.create_task(sdk.result("j4", timeout=10))
        await eventually(failing, what="a failed read, logged")
        await client.delete(stream)
        await client.xadd(stream, {"result": result("j4")})
        assert (await asyncio.wait_for(second, 5)).id == "j4"
    assert logged(bad) == 1  # not read again: the listener went on from where it was


async def test_run_returns_the_result_with_the_client_clock_ahead_of_redis(
        roles: Roles, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    roles.start("policy", env=FAST_ENV)
    roles.start("worker", "--pool", "gpu", env=FAST_ENV)
    roles.start("worker", "--pool", "accel", env=FAST_ENV)
    await asyncio.to_thread(wait_for_roles, redis_url, Topology(prefix), {"gpu": 1, "accel": 1})
    clock_ahead(monkeypatch)
    job = Job(id="skewed", model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=8)
    async with Client(redis_url, prefix=prefix) as sdk:
        got = await sdk.run(job, timeout=SKEW_S - 0.5)  # found on the stream, not by the skew running out
    assert got.status == "ok"


async def test_a_result_consumer_group_skips_an_entry_that_is_not_a_result(
        client: aioredis.Redis, redis_url: str, prefix: str) -> None:
    # An undecodable entry ended the iteration, and came back first on every restart.
    stream = Topology(prefix).reply("results")
    await client.xadd(stream, {"result": b"\x00 not a result"})
    await client.xadd(stream, {"result": result("j5")})
    async with Client(redis_url, prefix=prefix) as sdk:
        results = sdk.results("app")
        got = await asyncio.wait_for(anext(results), 5)
        await results.aclose()
    assert got.id == "j5"
