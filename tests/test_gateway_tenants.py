"""The gateway in tenant spaces: an API key whose tenant the policy config names (``[tenants]``)
has its requests, token streams, cancellations and batches in that tenant's own keys; any other
key's run in the default space, the tenant a label on the job, as before.

Real roles, ``python -m cli gateway`` and the official ``openai`` client, as in test_gateway.py;
the last test runs them under their least-privilege ACL users (broker/acl.py), as test_acl.py does.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from broker import acl
from broker.config import default_config_text
from broker.topology import Topology
from broker.wire import Result, decode_job, decode_result, json_encode
from cli.stack import wait_for_roles
from tests.conftest import Roles, _start
from tests.deployments import ON_BOTH, streams, xlen_all, xrange_all
from tests.gateway_proc import KEY, OTHER_KEY, GatewayProc, start_gateway
from tests.helpers import admitting_all, eventually
from tests.test_acl import FAST_ROLE_ENV, EnvRoles, Users
from tests.test_gateway_batches import CHAT, final, jsonl, lines_of, request

GAMMA_KEY = "sk-test-gamma-1357924680"
"""An API key of tenant ``gamma``, which the policy config does not name: the default space."""
KEYS = {KEY: "acme", OTHER_KEY: "beta", GAMMA_KEY: "gamma"}
TENANTS = "\n[tenants.acme]\n\n[tenants.beta]\n"
MESSAGES: Any = [{"role": "user", "content": "Why is the sky blue?"}]


def environment(tmp_path: Path) -> dict[str, str]:
    """The roles' and the gateway's env: a policy config with tenants acme and beta, fast batches."""
    config = tmp_path / "policy.toml"
    config.write_text(admitting_all(default_config_text()) + TENANTS)
    return {"IB_CONFIG": str(config), "IB_GATEWAY_FILES_DIR": str(tmp_path / "files"),
            "IB_GATEWAY_BATCH_POLL_S": "0.1", "IB_GATEWAY_BATCH_LEASE_S": "1"}


def start_roles(roles: Roles, env: dict[str, str]) -> None:
    roles.start("policy", env=env)
    roles.start("worker", "--pool", "gpu", "--grace", "5", env=env)


async def gateway_of(roles: Roles, tmp_path: Path, topo: Topology, *, workers: bool = True) -> GatewayProc:
    """A gateway with the three keys (and a policy worker and a gpu worker, ready, with ``workers``)."""
    env = environment(tmp_path)
    if workers:
        start_roles(roles, env)
    gateway = await start_gateway(roles, tmp_path, env=env, keys=KEYS)
    if workers:
        wait_for_roles(roles.url, topo, {"gpu": 1}, timeout=30)
    return gateway


async def where(client: aioredis.Redis, topo: Topology, job_id: str) -> dict[str, Result]:
    """The outcome of ``job_id`` in each space that has one: ``""`` (default), ``acme``, ``beta``."""
    found = {}
    for tenant in ("", "acme", "beta"):
        space = topo.of_tenant(tenant).of_job(job_id)
        raw = await client.get(space.done(job_id))
        if raw is not None:
            found[tenant] = decode_result(raw)
    return found


@ON_BOTH
async def test_each_configured_tenants_requests_run_in_its_own_space_and_others_in_the_default(
        roles: Roles, tmp_path: Path, topo: Topology, client: aioredis.Redis) -> None:
    gateway = await gateway_of(roles, tmp_path, topo)
    for key, tenant, space in ((KEY, "acme", "acme"), (OTHER_KEY, "beta", "beta"), (GAMMA_KEY, "gamma", "")):
        async with gateway.openai(key) as api:
            raw = await api.chat.completions.with_raw_response.create(model="llama-3.1-8b", messages=MESSAGES,
                                                                      max_tokens=6)
            chat = raw.parse()
            job_id = raw.headers["x-ib-job-id"]
            assert chat.choices[0].message.content, tenant
            outcomes = await where(client, topo, job_id)
            assert list(outcomes) == [space], (tenant, outcomes)  # in its space, and in no other
            assert (outcomes[space].status, outcomes[space].tenant) == ("ok", tenant)
            assert outcomes[space].output == chat.choices[0].message.content

            streamed = await api.chat.completions.with_raw_response.create(
                model="llama-3.1-8b", messages=MESSAGES, max_tokens=5, stream=True)
            streamed_id = streamed.headers["x-ib-job-id"]
            pieces = [part.choices[0].delta.content or "" async for part in streamed.parse() if part.choices]
            assert "".join(pieces), tenant
            assert list(await where(client, topo, streamed_id)) == [space], tenant
    # None was refused as forged: the gateway wrote each configured tenant's job to its own ingress.
    assert await xlen_all(client, streams(topo, lambda shard: shard.dead)) == 0


async def test_a_client_leaving_cancels_its_job_in_its_tenants_space(
        roles: Roles, tmp_path: Path, topo: Topology, client: aioredis.Redis) -> None:
    gateway = await gateway_of(roles, tmp_path, topo, workers=False)  # no policy worker: the job stays queued
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{gateway.url}/v1/chat/completions", timeout=1.0,
                            headers={"authorization": f"Bearer {KEY}"},
                            json={"model": "llama-3.1-8b", "messages": MESSAGES, "max_tokens": 4})
    [(_, fields)] = await client.xrange(topo.of_tenant("acme").jobs)  # acme's ingress, not the default one
    job_id = decode_job(fields[b"job"]).id
    assert await client.xlen(topo.jobs) == 0

    async def cancelled() -> bool:
        return bool(await where(client, topo, job_id))

    await eventually(cancelled, what="the job's cancelled outcome")
    outcomes = await where(client, topo, job_id)
    assert list(outcomes) == ["acme"] and outcomes["acme"].status == "cancelled"


async def test_batches_run_in_their_tenants_spaces_and_a_result_counts_only_in_its_own(
        roles: Roles, tmp_path: Path, topo: Topology, client: aioredis.Redis) -> None:
    gateway = await gateway_of(roles, tmp_path, topo, workers=False)  # the roles come once the forgery is read
    made = {}
    for key, tenant in ((KEY, "acme"), (GAMMA_KEY, "gamma")):
        async with gateway.openai(key, timeout=10) as ai:
            uploaded = await ai.files.create(file=("in.jsonl", jsonl([request(f"{tenant}{i}") for i in range(3)])),
                                             purpose="batch")
            made[tenant] = (await ai.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                                    completion_window="24h")).id
    acme = topo.of_tenant("acme")

    async def submitted() -> bool:  # the lines wait on their tenants' ingress streams
        return bool(await client.xlen(acme.jobs) == 3 and await client.xlen(topo.jobs) == 3)

    await eventually(submitted, what="the batches' lines on acme's and the default ingress")
    # acme may write its own reply streams (its ACL user can): a result there naming gamma's
    # batch line must not count for that line, nor be left pending.
    forged = Result(id=f"{made['gamma']}.0", status="ok", model="llama-3.1-8b", kind="chat", tenant="acme",
                    output="FORGED")
    forged_at = (await client.xadd(acme.reply("batches"), {"result": json_encode(forged)})).decode()

    async def read_and_acked() -> bool:
        groups = await client.xinfo_groups(acme.reply("batches"))
        return any(g["name"] == b"gateway-batches" and g["last-delivered-id"].decode() == forged_at
                   and g["pending"] == 0 for g in groups)

    await eventually(read_and_acked, what="the gateway to read and ack the forged result")
    start_roles(roles, environment(tmp_path))

    for key, tenant in ((KEY, "acme"), (GAMMA_KEY, "gamma")):
        async with gateway.openai(key, timeout=10) as ai:
            done = await final(ai, made[tenant])
            assert done.status == "completed" and done.request_counts is not None, done
            assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)
            output = await lines_of(ai, done.output_file_id)
            assert [line["custom_id"] for line in output] == [f"{tenant}{i}" for i in range(3)]
            assert all(line["response"]["body"]["choices"][0]["message"]["content"] != "FORGED" for line in output)
    # Each line's one result is on its space's batch reply stream (and the forgery on acme's).
    on_stream = {}
    for name, space in (("acme", acme), ("default", topo)):
        entries = await xrange_all(client, streams(space, lambda shard: shard.reply("batches")))
        on_stream[name] = sorted(decode_result(fields[b"result"]).id for _, fields in entries)
    assert on_stream == {"acme": sorted([f"{made['acme']}.{i}" for i in range(3)] + [forged.id]),
                         "default": [f"{made['gamma']}.{i}" for i in range(3)]}


@pytest_asyncio.fixture
async def users(prefix: str) -> AsyncIterator[Users]:
    """The deployment's least-privilege users (tenants acme and beta) on a redis-server of the test's own."""
    server = _start()
    found = Users(server, acl.Deployment(prefix=prefix, pools=("gpu", "accel"), tenants=("acme", "beta"),
                                         users=f"{prefix}-"))
    try:
        await found.apply()
        yield found
    finally:
        await found.admin.aclose()
        server.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="role processes")
async def test_under_its_own_acl_user_the_gateway_serves_every_space(users: Users, tmp_path: Path) -> None:
    env = {**environment(tmp_path), **FAST_ROLE_ENV}
    roles = EnvRoles(users, tmp_path)
    try:
        roles.as_user("policy", "policy", env=env)
        roles.as_user("worker-gpu", "worker", "--pool", "gpu", "--grace", "5", env=env)
        gateway = await start_gateway(roles, tmp_path, env={**env, "REDIS_URL": users.url("gateway")}, keys=KEYS)
        for key in (KEY, GAMMA_KEY):  # acme's space, and the default one
            async with gateway.openai(key, timeout=30) as ai:
                reply = await ai.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES, max_tokens=4)
                assert reply.choices[0].message.content
                assert [c.id async for c in await ai.chat.completions.create(
                    model="llama-3.1-8b", messages=MESSAGES, max_tokens=4, stream=True)]
                uploaded = await ai.files.create(file=("in.jsonl", jsonl([request("a"), request("b")])),
                                                 purpose="batch")
                created = await ai.batches.create(input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h")
                done = await final(ai, created.id)
                assert done.status == "completed" and done.request_counts is not None, done
                assert done.request_counts.completed == 2, done
    finally:
        roles.stop_all()
    assert await users.denials() == []  # nothing the gateway (or a role) did was refused by Redis
