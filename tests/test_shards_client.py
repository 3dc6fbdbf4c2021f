"""The operator commands cover every shard of a deployment, on one node and on a cluster.

A deployment of three shards, with a policy worker and a gpu worker serving them all, on a
single redis-server and on a local three-primary Redis Cluster (one of each per module).
The commands run in-process (click's runner, in a thread: each runs its own event loop)
with ``--shards 3``: ``submit`` puts a job on the shard of its id and ``result`` finds it
there; ``results`` reads every shard's stream in time order; ``dead list`` shows letters
of two shards as ``<shard>/<entry id>`` and ``dead replay`` sends one back to its own shard;
``top --once`` sums every shard's backlog and dead letters.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from click.testing import CliRunner, Result

from broker.client import Client
from broker.connection import connect
from broker.streams import ensure_group
from broker.topology import POLICY_GROUP, Topology, shard_of
from broker.wire import DeadLetter, Job, decode_result, json_encode
from cli.embedded import EmbeddedRedis
from cli.main import main
from tests.conftest import FAST_ENV, Roles
from tests.helpers import eventually

SHARDS = 3


class Deployment(msgspec.Struct, frozen=True):
    url: str
    prefix: str

    @property
    def topo(self) -> Topology:
        return Topology(self.prefix, SHARDS)


@pytest.fixture(scope="module", params=["node", "cluster"])
def deployment(request: pytest.FixtureRequest, redis_server: EmbeddedRedis,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Three shards served by a policy worker and a gpu worker (with fault injection)."""
    url = redis_server.url
    if request.param == "cluster":
        url = request.getfixturevalue("redis_cluster").url
    here = Deployment(url, f"t{uuid.uuid4().hex[:10]}")
    roles = Roles(url, here.prefix, tmp_path_factory.mktemp("roles"), SHARDS)
    roles.start("policy", env=FAST_ENV)
    roles.start("worker", "--pool", "gpu", env=FAST_ENV)
    try:
        yield here
    finally:
        roles.stop_all()
        if request.session.testsfailed:
            print(roles.logs())


@pytest_asyncio.fixture
async def redis(deployment: Deployment) -> AsyncIterator[aioredis.Redis]:
    client = connect(deployment.url)
    yield client
    await client.aclose()


async def cli(deployment: Deployment, *args: str, prefix: str | None = None, stdin: str | None = None) -> Result:
    """``inference-broker <args>`` against the deployment (or another prefix on its Redis)."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("IB_") or k == "REDIS_URL"}
    argv = [*args, "--redis-url", deployment.url, "--prefix", prefix or deployment.prefix, "--shards", str(SHARDS)]
    return await asyncio.to_thread(CliRunner().invoke, main, argv, input=stdin, env=env, prog_name="inference-broker")


def one_per_shard(tag: str) -> list[str]:
    """A job id on each shard, shard 0 first."""
    ids: dict[int, str] = {}
    i = 0
    while len(ids) < SHARDS:
        ids.setdefault(shard_of(f"{tag}-{i}", SHARDS), f"{tag}-{i}")
        i += 1
    return [ids[shard] for shard in range(SHARDS)]


def job(job_id: str, **metadata: str) -> Job:
    return Job(id=job_id, model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=3, metadata=metadata)


async def test_submit_puts_each_job_on_the_shard_of_its_id_and_result_reads_it_there(
        deployment: Deployment, redis: aioredis.Redis) -> None:
    topo = deployment.topo
    ids = one_per_shard(f"cli-{uuid.uuid4().hex[:6]}")
    for job_id in ids:
        done = await cli(deployment, "submit", "--job", "-", "--json", stdin=json_encode(job(job_id)).decode())
        assert done.exit_code == 0, done.output
        assert decode_result(done.stdout.strip()).status == "ok"
    for job_id in ids:
        # Its result (done key and reply entry) is on its shard alone.
        holders = [shard.shard for shard in topo.every_shard if await redis.exists(shard.done(job_id))]
        assert holders == [shard_of(job_id, SHARDS)]
    found = await cli(deployment, "result", ids[2])
    assert found.exit_code == 0 and f"job {ids[2]}: ok" in found.stdout, found.output


async def test_results_reads_every_shard_in_time_order_and_a_group_gets_each_once(
        deployment: Deployment, redis: aioredis.Redis) -> None:
    topo = deployment.topo
    ids = [f"res-{uuid.uuid4().hex[:6]}-{i}" for i in range(12)]
    async with Client(deployment.url, prefix=deployment.prefix, shards=SHARDS) as sdk:
        await sdk.submit_many([job(i) for i in ids])
        await asyncio.gather(*(sdk.result(i, timeout=20) for i in ids))
    assert {shard_of(i, SHARDS) for i in ids} == set(range(SHARDS))
    # By entry id, then shard: two shards on one node may give two entries the same id.
    entries = [(*map(int, entry_id.split(b"-")), shard.shard, decode_result(fields[b"result"]).id)
               for shard in topo.every_shard for entry_id, fields in await redis.xrange(shard.reply("results"))]
    in_time_order = [entry[-1] for entry in sorted(entries)]
    assert set(ids) <= set(in_time_order)

    listed = await cli(deployment, "results", "--json")
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == in_time_order
    followed = await cli(deployment, "results", "--follow", "--limit", str(len(in_time_order)), "--json")
    assert followed.exit_code == 0, followed.output
    assert sorted(json.loads(line)["id"] for line in followed.stdout.splitlines()) == sorted(in_time_order)

    # Through a group: a first read of 2, then the rest; each result exactly once over both,
    # though the first read fetched a page from every shard.
    first = await cli(deployment, "results", "--group", "g", "--limit", "2", "--json")
    rest = await cli(deployment, "results", "--group", "g", "--json")
    got = [json.loads(line)["id"] for run in (first, rest) for line in run.stdout.splitlines()]
    assert len(first.stdout.splitlines()) == 2 and sorted(got) == sorted(in_time_order), (first.output, rest.output)
    for shard in topo.every_shard:
        assert (await redis.xpending(shard.reply("results"), "g"))["pending"] == 0


async def test_dead_letters_of_two_shards_are_listed_and_one_is_replayed_on_its_own_shard(
        deployment: Deployment, redis: aioredis.Redis) -> None:
    topo = deployment.topo
    ids = one_per_shard(f"dead-{uuid.uuid4().hex[:6]}")[1:]  # shards 1 and 2
    async with Client(deployment.url, prefix=deployment.prefix, shards=SHARDS) as sdk:
        failed = await asyncio.gather(*(sdk.run(job(i, fault="permanent"), timeout=20) for i in ids))
    assert [r.status for r in failed] == ["failed", "failed"]

    async def letters() -> dict[str, str]:
        """Job id to its dead letter's id, as `dead list --json` gives them."""
        listed = await cli(deployment, "dead", "list", "--json")
        assert listed.exit_code == 0, listed.output
        return {d["job_id"]: d["dead_entry_id"] for d in map(json.loads, listed.stdout.splitlines())}

    async def both_dead() -> bool:
        return set(ids) <= set(await letters())

    await eventually(both_dead, what="a dead letter of each job")
    before = await letters()
    assert [before[i].split("/")[0] for i in ids] == ["1", "2"]
    table = await cli(deployment, "dead", "list")
    assert all(before[i] in table.stdout.split() for i in ids), table.output

    replayed = await cli(deployment, "dead", "replay", before[ids[1]])
    assert replayed.exit_code == 0 and "replayed 1 job(s)" in replayed.stdout, replayed.output

    # The job runs again on shard 2, fails again (its fault goes with it), and dies there anew.
    async def died_again() -> bool:
        return (await letters()).get(ids[1], before[ids[1]]) != before[ids[1]]

    await eventually(died_again, what="the replayed job's new dead letter")
    after = await letters()
    assert after[ids[1]].startswith("2/") and after[ids[0]] == before[ids[0]]
    assert [await redis.xlen(shard.dead) for shard in topo.every_shard] == [0, 1, 1]


async def test_a_letter_on_another_shard_than_its_job_replays_onto_the_jobs_shard_and_bad_ids_say_why(
        deployment: Deployment, redis: aioredis.Redis) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"  # no roles here: the replayed job stays on the ingress
    topo = Topology(prefix, SHARDS)
    job_id = one_per_shard("moved")[1]
    # A producer with the wrong shard count put it on shard 0's ingress, where it died.
    letter = DeadLetter(reason="backend_error", error="no", stream=topo.at(0).jobs, entry_id="1-1",
                        payload=json_encode(job(job_id)), job_id=job_id)
    entry_id = (await redis.xadd(topo.at(0).dead, {"dead": json_encode(letter)})).decode()

    for bad, why in (("x/1-0", "is not a dead-letter id"), ("5/1-0", "there is no shard 5"),
                     (entry_id, "names no shard")):
        refused = await cli(deployment, "dead", "replay", bad, prefix=prefix)
        assert refused.exit_code == 2 and why in refused.stderr, refused.output
        assert len([line for line in refused.stderr.splitlines() if line.startswith("Error")]) == 1

    replayed = await cli(deployment, "dead", "replay", f"0/{entry_id}", prefix=prefix)
    assert replayed.exit_code == 0 and "replayed 1 job(s)" in replayed.stdout, replayed.output
    assert [await redis.xlen(shard.dead) for shard in topo.every_shard] == [0, 0, 0]
    ingress = [json.loads(fields[b"job"])["id"] for _id, fields in await redis.xrange(topo.at(1).jobs)]
    assert ingress == [job_id]
    assert await redis.xlen(topo.at(0).jobs) == 0


async def test_top_once_sums_the_backlog_and_dead_letters_of_every_shard(
        deployment: Deployment, redis: aioredis.Redis, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"  # no roles here: the backlog stays
    topo = Topology(prefix, SHARDS)
    for shard in topo.every_shard:
        await ensure_group(redis, shard.jobs, POLICY_GROUP)
        for _ in range(shard.shard + 1):  # 1 + 2 + 3 jobs waiting
            await redis.xadd(shard.jobs, {"job": b"{}"})
    for shard in topo.every_shard[1:]:
        await redis.xadd(shard.dead, {"dead": b"{}"})
    frame = await cli(deployment, "top", "--once", prefix=prefix)
    assert frame.exit_code == 0, frame.output
    row = re.search(r"│ jobs +│ policy +│ +(\d+) │ +(\d+) │ +(\d+) │", frame.stdout)
    assert row and row.groups() == ("6", "6", "0"), frame.stdout
    assert len(re.findall(r"│ jobs ", frame.stdout)) == 1  # one row for the three shards
    assert "dead letters 2" in frame.stdout
