"""The gateway when things go away: its client, itself (SIGKILL), or on purpose (SIGTERM drain).

Each job the gateway submitted ends in exactly one visible outcome: a client that leaves
before its job started ends it ``cancelled``; a gateway killed mid-request leaves its jobs
to run (their results kept under their ids); a draining gateway finishes what is in flight.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from broker.topology import Topology
from broker.wire import decode_job, decode_result
from cli.embedded import EmbeddedRedis
from cli.stack import wait_for_roles
from tests.conftest import Roles, _start
from tests.gateway_proc import KEY, GatewayProc, start_gateway
from tests.helpers import eventually, lanes, result_counts

AUTH = {"authorization": f"Bearer {KEY}"}


def chat(max_tokens: int = 4, **extra: object) -> dict[str, object]:
    return {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            **extra}


async def submitted(client: aioredis.Redis, topo: Topology) -> list[str]:
    """Ids of the jobs on the ingress stream, in order."""
    return [decode_job(fields[b"job"]).id for _id, fields in await client.xrange(topo.jobs)]


async def in_flight(gateway: GatewayProc) -> int:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{gateway.url}/metrics")).text
    return int(sum(float(v) for v in re.findall(r'^inference_broker_gateway_in_flight\{[^}]*\} (\S+)$', text, re.M)))


async def outcome(client: aioredis.Redis, topo: Topology, job_id: str) -> str | None:
    done = await client.get(topo.of_job(job_id).done(job_id))
    return None if done is None else decode_result(done).status


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_leaves_before_its_job_started_cancels_it(
        roles: Roles, tmp_path: Path, topo: Topology, client: aioredis.Redis, stream: bool) -> None:
    gateway = await start_gateway(roles, tmp_path)  # no policy worker: the job stays queued
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{gateway.url}/v1/chat/completions", json=chat(stream=stream), headers=AUTH, timeout=1.0)
    [job_id] = await submitted(client, topo)

    async def cancelled() -> bool:
        return await outcome(client, topo, job_id) == "cancelled"

    await eventually(cancelled, what="the job ended as cancelled")
    roles.policy()  # a policy worker that comes later finds it ended, and routes nothing
    roles.worker("gpu")
    wait_for_roles(roles.url, topo, {"gpu": 1}, timeout=30)

    async def handled() -> bool:  # the policy deletes the ingress entries it is done with
        return await client.xlen(topo.jobs) == 0

    await eventually(handled, what="the policy worker to take the cancelled job off the ingress")
    # ROUTE acks an ingress entry and adds its lane entry in one script, and a lane entry stays
    # until its worker acks it: empty lanes now mean it was never routed, or already answered.
    assert [s for t in topo.every_shard for pool in ("gpu", "accel") for s in lanes(t, pool)
            if await client.xlen(s)] == []
    ids, statuses = await result_counts(client, topo)
    assert ids[job_id] == 1 and statuses == {"cancelled": 1}
    assert await in_flight(gateway) == 0


async def test_a_gateway_killed_mid_request_loses_no_job(
        roles: Roles, tmp_path: Path, topo: Topology, client: aioredis.Redis) -> None:
    gateway = await start_gateway(roles, tmp_path)
    async with httpx.AsyncClient(timeout=30) as http:
        requests = [asyncio.create_task(http.post(f"{gateway.url}/v1/chat/completions", json=chat(), headers=AUTH))
                    for _ in range(5)]

        async def all_submitted() -> bool:
            return len(await submitted(client, topo)) == 5

        await eventually(all_submitted, what="5 jobs on the ingress")
        gateway.proc.send_signal(signal.SIGKILL)
        answers = await asyncio.gather(*requests, return_exceptions=True)
    assert all(isinstance(a, httpx.TransportError) for a in answers), answers
    ids = await submitted(client, topo)
    roles.policy()
    roles.worker("gpu")
    roles.worker("accel")

    async def every_job_ended() -> bool:
        return all([await outcome(client, topo, job_id) is not None for job_id in ids])

    await eventually(every_job_ended, timeout=60, what="an outcome for every job the killed gateway submitted")
    counts, statuses = await result_counts(client, topo)
    assert set(counts) == set(ids) and set(counts.values()) == {1} and statuses == {"ok": 5}


async def test_sigterm_drains_in_flight_requests_then_exits_0(
        roles: Roles, tmp_path: Path, topo: Topology, redis_url: str) -> None:
    roles.policy()
    roles.worker("gpu")
    gateway = await start_gateway(roles, tmp_path, "--grace", "20")
    wait_for_roles(redis_url, topo, {"gpu": 1}, timeout=30)
    async with httpx.AsyncClient(timeout=30) as http:
        # ~600 tokens at the simulated H100's 4.6 ms each: a few seconds in flight.
        slow = asyncio.create_task(http.post(f"{gateway.url}/v1/chat/completions", headers=AUTH,
                                             json=chat(600, service_tier="flex")))

        async def serving() -> bool:
            return await in_flight(gateway) == 1

        await eventually(serving, what="the request in flight")
        gateway.proc.send_signal(signal.SIGTERM)
        answer = await slow
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 600
    assert await asyncio.to_thread(gateway.proc.wait, 30) == 0


async def test_a_drain_past_its_grace_cuts_the_request_and_cancels_its_job(
        roles: Roles, tmp_path: Path, topo: Topology, client: aioredis.Redis) -> None:
    gateway = await start_gateway(roles, tmp_path, "--grace", "1")  # no policy: the job never starts
    async with httpx.AsyncClient(timeout=30) as http:
        waiting = asyncio.create_task(http.post(f"{gateway.url}/v1/chat/completions", json=chat(), headers=AUTH))

        async def queued() -> bool:
            return len(await submitted(client, topo)) == 1

        await eventually(queued, what="the job on the ingress")
        gateway.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(gateway.proc.wait, 30) == 0
        answer = await asyncio.gather(waiting, return_exceptions=True)
    assert isinstance(answer[0], httpx.TransportError) or answer[0].status_code >= 500  # type: ignore[union-attr]
    [job_id] = await submitted(client, topo)
    assert await outcome(client, topo, job_id) == "cancelled"


async def test_without_redis_the_gateway_is_not_ready_and_answers_503(
        servers: list[EmbeddedRedis], make_roles: Callable[[str], Roles], tmp_path: Path) -> None:
    server = _start(directory=tmp_path / "redis")
    servers.append(server)
    gateway = await start_gateway(make_roles(server.url), tmp_path)
    server.kill()
    async with httpx.AsyncClient(timeout=60) as http:
        async def not_ready() -> bool:
            return (await http.get(f"{gateway.url}/readyz")).status_code == 503

        await eventually(not_ready, what="/readyz to say 503")
        assert (await http.get(f"{gateway.url}/healthz")).status_code == 200  # alive all the same
        answer = await http.post(f"{gateway.url}/v1/chat/completions", json=chat(), headers=AUTH)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "broker_unavailable"
    assert answer.headers["retry-after"] == "1"
