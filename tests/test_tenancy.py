"""Tenant spaces end to end, on a node and on a cluster: each tenant's jobs, results, token
streams and reply streams in its own keys, its tenant taken from the ingress it used.

Redis ACLs make the spaces a boundary (tests/test_acl.py runs every role under its own user);
here every client is trusted, to show what the broker itself does with the spaces.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis.asyncio as aioredis

from broker.client import Client
from broker.config import default_config_text
from broker.dead import read_letters, replayable_job
from broker.janitor import Janitor
from broker.settings import Settings
from broker.tenancy import free_finished
from broker.topology import Topology
from broker.wire import DeadLetter, Job, Result, Route, RoutedJob, decode_result, json_encode
from policies.config import TenantSpec
from policies.tenants import TenantLedger
from tests.conftest import Roles
from tests.deployments import ON_BOTH, streams, xrange_all
from tests.helpers import admitting_all, eventually

TENANTS = "\n[tenants.acme]\n\n[tenants.globex]\nweight = 2.0\n"


def start(roles: Roles, tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(admitting_all(default_config_text()) + TENANTS)
    env = {"IB_CONFIG": str(config)}
    roles.start("policy", env=env)
    roles.worker("gpu")


def chat(job_id: str, **fields: object) -> Job:
    return Job.chat("llama-3.1-8b", f"hello from {job_id}", id=job_id, max_tokens=4, **fields)


@ON_BOTH
async def test_each_tenant_gets_its_own_results_under_the_same_ids(roles: Roles, redis_url: str, prefix: str,
                                                                   shards: int, topo: Topology,
                                                                   client: aioredis.Redis, tmp_path: Path) -> None:
    start(roles, tmp_path)
    ids = [f"job-{i}" for i in range(40)]
    async with (Client(redis_url, prefix=prefix, shards=shards, tenant="acme") as acme,
                Client(redis_url, prefix=prefix, shards=shards, tenant="globex") as globex):
        # globex submits acme's ids first (squatting): both tenants' jobs run, each its own.
        await globex.submit_many(chat(i, metadata={"who": "globex"}) for i in ids)
        await acme.submit_many(chat(i, reply_to="mine", stream=True) for i in ids)
        theirs = await asyncio.gather(*(globex.result(i, timeout=60) for i in ids))
        ours = await asyncio.gather(*(acme.result(i, timeout=60, reply_to="mine") for i in ids))
        tokens = [c async for c in acme.tokens(ids[0], timeout=30)]
    assert {r.tenant for r in theirs} == {"globex"} and {r.tenant for r in ours} == {"acme"}
    assert all(r.status == "ok" for r in theirs + ours), [r.error for r in theirs + ours if r.status != "ok"]
    assert tokens and tokens[-1].end == "ok"

    # Each result is in its tenant's space and nowhere else: not in the default space, and
    # acme's reply_to `mine` is acme's stream, not a stream of the default space.
    acme_keys, globex_keys = topo.of_tenant("acme"), topo.of_tenant("globex")
    for i in ids:
        assert await client.exists(acme_keys.of_job(i).done(i), globex_keys.of_job(i).done(i)) == 2
        assert not await client.exists(topo.of_job(i).done(i))
    mine = await xrange_all(client, streams(acme_keys, lambda t: t.reply("mine")))
    assert sorted(decode_result(f[b"result"]).id for _, f in mine) == sorted(ids)
    assert await xrange_all(client, streams(topo, lambda t: t.reply("mine"))) == []
    assert streams(acme_keys, lambda t: t.reply("mine"))[0].endswith(":~acme:r:mine")


@ON_BOTH
async def test_a_job_naming_another_tenant_is_refused_with_a_reason(roles: Roles, redis_url: str, prefix: str,
                                                                    shards: int, topo: Topology,
                                                                    client: aioredis.Redis, tmp_path: Path) -> None:
    start(roles, tmp_path)
    async with (Client(redis_url, prefix=prefix, shards=shards, tenant="acme") as acme,
                Client(redis_url, prefix=prefix, shards=shards) as anyone):
        await acme.submit(chat("forged", tenant="globex"))
        await acme.submit(chat("own", tenant="acme"))  # naming itself is fine
        await anyone.submit(chat("default-forged", tenant="acme"))
        await anyone.submit(chat("label", tenant="team-x"))  # a label, no tenant of the config
        forged = await acme.result("forged", timeout=30)
        own = await acme.result("own", timeout=30)
        default_forged = await anyone.result("default-forged", timeout=30)
        label = await anyone.result("label", timeout=30)
    assert forged.status == "failed" and forged.tenant == "acme" and "forged_tenant" in (forged.error or "")
    assert own.status == "ok" and own.tenant == "acme"
    assert default_forged.status == "failed" and "forged_tenant" in (default_forged.error or "")
    assert label.status == "ok" and label.tenant == "team-x"
    # Nothing reached globex's or acme's space on behalf of the forgers.
    globex = topo.of_tenant("globex")
    assert not await client.exists(globex.of_job("forged").done("forged"))
    assert not await client.exists(topo.of_tenant("acme").of_job("default-forged").done("default-forged"))
    letters = await read_letters(client, topo, reason="forged_tenant")
    assert sorted(letter.job_id or "" for _shard, _id, letter in letters) == ["default-forged", "forged"]


def test_a_dead_letter_replays_to_its_own_tenants_ingress() -> None:
    topo = Topology("ib")
    job = chat("j")

    def letter(stream: str, payload: bytes) -> DeadLetter:
        return DeadLetter(reason="internal_error", error="e", stream=stream, entry_id="1-0", payload=payload)

    route = Route(pool="gpu", slo="standard", reason="r", routed_at=1.0, ttft_target_ms=1.0)
    routed = RoutedJob(job=job, route=route, created_at=1.0, space="acme")
    assert replayable_job(letter(topo.of_tenant("acme").jobs, json_encode(job)), topo) == (json_encode(job), "acme")
    assert replayable_job(letter(topo.jobs, json_encode(job)), topo) == (json_encode(job), "")
    assert replayable_job(letter(topo.pool("gpu"), json_encode(routed)), topo) == (json_encode(job), "acme")


def test_each_policy_worker_enforces_its_share_of_a_limit() -> None:
    rate = TenantLedger({"acme": TenantSpec(jobs_per_s=10.0, burst_s=1.0)})
    slots = TenantLedger({"acme": TenantSpec(concurrent=4)})
    rate.reshare(0.5)  # two policy workers live
    slots.reshare(0.5)
    admitted = [rate.admit("acme", f"j{i}", 10, 0.0, contended=False).admitted for i in range(10)]
    assert admitted == [True] * 5 + [False] * 5
    assert [slots.admit("acme", f"j{i}", 10, 0.0, contended=False).admitted for i in range(3)] == [True, True, False]


async def test_the_ledger_learns_from_done_keys_which_admitted_jobs_ended(client: aioredis.Redis,
                                                                         topo: Topology) -> None:
    ledger = TenantLedger({"acme": TenantSpec(concurrent=2)})
    assert [ledger.admit("acme", i, 10, 0.0, contended=False).admitted for i in ("a", "b", "c")] == [True, True, False]
    await client.set(topo.of_tenant("acme").of_job("a").done("a"), b"{}")
    await client.set(topo.of_job("b").done("b"), b"{}")  # the default space's "b" is another job
    assert await free_finished(client, topo, ledger) == 1
    assert ledger.outstanding("acme") == ["b"]
    assert ledger.admit("acme", "c", 10, 0.0, contended=False).admitted


async def test_the_default_space_may_be_held_to_its_reply_streams(roles: Roles, redis_url: str, prefix: str,
                                                                  tmp_path: Path) -> None:
    # With ACL users the workers may write only the listed reply streams of the default
    # space: the policy worker refuses any other name before a worker would be refused.
    config = tmp_path / "policy.toml"
    config.write_text(admitting_all(default_config_text()))
    env = {"IB_CONFIG": str(config), "IB_REPLY_STREAMS": "results, mine"}
    roles.start("policy", env=env)
    roles.worker("gpu")
    async with Client(redis_url, prefix=prefix) as anyone:
        await anyone.submit_many([chat("listed", reply_to="mine"), chat("unlisted", reply_to="elsewhere")])
        listed = await anyone.result("listed", timeout=30, reply_to="mine")
        unlisted = await anyone.result("unlisted", timeout=30, reply_to="elsewhere")
    assert listed.status == "ok"
    assert unlisted.status == "failed" and "IB_REPLY_STREAMS" in (unlisted.error or ""), unlisted


async def test_a_tenants_reply_streams_are_trimmed_and_reaped_like_the_default_spaces(
        redis_url: str, prefix: str, client: aioredis.Redis) -> None:
    settings = Settings(redis_url=redis_url, prefix=prefix, results_retention_s=0)
    acme = settings.topology.of_tenant("acme")
    stream, path = acme.reply("mine"), acme.reply_path("mine")
    janitor = Janitor(client, settings, {})
    await janitor.start()
    for i in range(3):  # as COMPLETE writes a tenant's results: the stream, and its path in `replies`
        await client.xadd(stream, {"result": json_encode(Result(id=f"j{i}", status="ok", model="m", kind="chat",
                                                                tenant="acme"))})
    await client.sadd(acme.replies, path)
    assert path == "~acme:r:mine" and acme.under(path) == stream

    async def reaped() -> bool:  # read by no group and older than the retention: trimmed, then deleted
        await janitor.sweep(time.time())
        return not await client.exists(stream) and not await client.sismember(acme.replies, path)

    await eventually(reaped, timeout=10, what="the tenant's reply stream to be trimmed and reaped")


def test_the_ledger_offers_the_oldest_outstanding_ids_of_each_lane_for_checking() -> None:
    ledger = TenantLedger({"acme": TenantSpec()})
    for i in range(5):  # interleaved: lane 0's ids end sooner, lane 2's wait behind them
        ledger.admit("acme", f"a{i}", 10, 0.0, contended=False, lane=0)
        ledger.admit("acme", f"c{i}", 10, 0.0, contended=False, lane=2)
    assert ledger.oldest("acme", 2) == ["a0", "c0", "a1", "c1"]
    ledger.finished("acme", "a0")
    assert ledger.oldest("acme", 2) == ["c0", "a1", "c1", "a2"]
    assert ledger.oldest("acme", 9) == ledger.outstanding("acme")
    assert ledger.oldest("nobody", 2) == []
