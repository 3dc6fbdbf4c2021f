"""Producers without the SDK submit jobs to a sharded deployment on a Redis Cluster, by the documented rule.

docs/wire-format.md (Shards) says a job's shard is CRC16-XMODEM(id) mod 16384 mod S, the
``CLUSTER KEYSLOT`` of its id mod S, and shows a ``redis-cli -c`` session and a FastStream
``RedisClusterBroker`` producer. Here, on a real local cluster of 3 primaries (one for the
module) with S = 3 and a policy worker and one ``gpu`` pool worker running in-process: the
rule computed from scratch matches :func:`broker.topology.shard_of` and the cluster, and
the documented commands and code submit jobs that complete on their own shard.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from faststream.redis import RedisClusterBroker

from broker.config import load_config
from broker.connection import connect
from broker.policy_worker import PolicyWorker
from broker.settings import Settings
from broker.topology import Topology, shard_of
from broker.wire import Job, Result, decode_result, json_encode
from cli.cluster import EmbeddedCluster
from tests.conftest import ROOT
from tests.helpers import eventually
from tests.test_docs import documented_xadds
from workers.simulated import SimulatedBackend
from workers.worker import PoolWorker

SHARDS = 3
"""As in the docs' cluster session (``--shards 3``)."""
WIRE_FORMAT = ROOT / "docs" / "wire-format.md"


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = (crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM written out here, table-driven (not the docs' loop, not redis-py's)."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[(crc >> 8) ^ byte]
    return crc


def documented_python(marker: str) -> str:
    """The fenced Python block of docs/wire-format.md that contains ``marker``."""
    blocks: list[str] = re.findall(r"^```python\n(.*?)^```", WIRE_FORMAT.read_text(), flags=re.S | re.M)
    (block,) = [b for b in blocks if marker in b]
    return block


@dataclass
class Deployment:
    """A deployment of :data:`SHARDS` shards on the cluster, its roles running."""

    settings: Settings
    client: aioredis.Redis
    port: int
    """The first node's port: it does not own shard 2's slot, so commands there are redirected."""

    @property
    def topo(self) -> Topology:
        return self.settings.topology

    async def outcome(self, job_id: str, topo: Topology | None = None) -> Result:
        """The result of ``job_id`` on ``topo``'s shard (default: the id's own), once there."""
        done = (topo or self.topo.of_job(job_id)).done(job_id)
        await eventually(lambda: self.client.exists(done), timeout=20, what=f"the outcome of {job_id} at {done}")
        return decode_result(await self.client.get(done))

    async def results_of(self, job_id: str) -> list[int]:
        """The shards whose default reply stream holds a result of ``job_id`` (once per result)."""
        return [shard.shard for shard in self.topo.every_shard
                for _id, fields in await self.client.xrange(shard.reply("results"))
                if decode_result(fields[b"result"]).id == job_id]


@pytest_asyncio.fixture
async def deployment(redis_cluster: EmbeddedCluster, prefix: str) -> AsyncIterator[Deployment]:
    """The policy worker and one ``gpu`` worker (a simulated H100) on every shard, in-process."""
    host, port = redis_cluster.startup_nodes[0]
    url = f"redis+cluster://{host}:{port}"
    settings = Settings(redis_url=url, prefix=prefix, shards=SHARDS, block_ms=200, snapshot_s=0.05,
                        heartbeat_s=0.2, grace_s=2.0)
    config = load_config()
    client, policy_client, worker_client = (connect(url, settings.block_ms) for _ in range(3))
    stop = asyncio.Event()
    worker = PoolWorker(worker_client, settings, "gpu", SimulatedBackend("h100"), concurrency=8,
                        lanes=config.lanes, shares=config.lane_shares)
    roles = [asyncio.create_task(worker.run(stop))]

    async def worker_alive() -> bool:
        return bool(await client.hlen(settings.topology.heartbeats("gpu")))  # type: ignore[misc]

    try:
        # The policy starts once the worker has said it is alive, so it routes to gpu from the first job.
        await eventually(worker_alive, timeout=10, what="the gpu worker's first heartbeat")
        roles.append(asyncio.create_task(PolicyWorker(policy_client, settings, config).run(stop)))
        yield Deployment(settings, client, port)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*roles), 15)
        for c in (client, policy_client, worker_client):
            await c.aclose()


def needs_redis_cli() -> str:
    """Where redis-cli is; skips without it (fails in CI, as a missing redis-server does)."""
    found = shutil.which("redis-cli")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs redis-cli")
        pytest.skip("no redis-cli")
    return found


def test_the_documented_shard_rule_is_shard_of_and_the_clusters_keyslot(redis_cluster: EmbeddedCluster) -> None:
    assert crc16(b"123456789") == 0x31C3  # CRC-16/XMODEM's check value: this is that CRC
    documented: dict[str, Callable[..., object]] = {}
    exec(documented_python("def crc16"), documented)  # noqa: S102 - the docs' reference code, run as written
    ingress = documented["ingress"]
    ids = [uuid.uuid4().hex for _ in range(200)] + [f"order-{i}" for i in range(100)] + [
        "a", "doc-cl-2", "tenant/a:b@c+d=e.f_g-h", "x" * 128, "0"]
    host, port = redis_cluster.startup_nodes[0]
    node = redis.Redis(host=host, port=port, decode_responses=True)
    try:
        pipe = node.pipeline(transaction=False)
        for job_id in ids:
            pipe.execute_command("CLUSTER", "KEYSLOT", job_id)  # type: ignore[no-untyped-call]
        slots = pipe.execute()
    finally:
        node.close()
    for job_id, slot in zip(ids, slots, strict=True):
        assert crc16(job_id.encode()) % 16384 == slot, job_id
        assert slot % SHARDS == shard_of(job_id, SHARDS), job_id
        assert ingress(job_id, SHARDS, "ib") == Topology("ib", SHARDS).of_job(job_id).jobs, job_id
        assert ingress(job_id, 1, "ib") == Topology("ib").jobs == "ib:{ib}:jobs"
    assert {shard_of(job_id, SHARDS) for job_id in ids} == set(range(SHARDS))


@pytest.mark.parametrize("prefix", ["ib"])  # the docs' own keys, on this module's fresh cluster
async def test_the_documented_redis_cli_xadd_completes_on_the_jobs_shard(deployment: Deployment) -> None:
    cli = needs_redis_cli()
    commands = documented_xadds(cluster=True)
    assert commands
    sent: Counter[str] = Counter()  # on this module's fresh cluster, no one else adds to the docs' keys
    for argv in commands:
        argv = [cli, *argv[1:]]
        argv[argv.index("-p") + 1] = str(deployment.port)  # the docs' node -> this cluster's first node
        xadd = argv.index("XADD")
        stream, job = argv[xadd + 1], msgspec.json.decode(argv[xadd + 4])
        assert stream == deployment.topo.of_job(job["id"]).jobs
        # The docs say a node that does not own the slot redirects a client without -c.
        plain = subprocess.run([a for a in argv if a != "-c"], capture_output=True, text=True, timeout=10)
        assert "MOVED" in plain.stdout + plain.stderr, plain
        added = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        assert added.returncode == 0 and re.fullmatch(r"\d+-\d+\n", added.stdout), added
        sent[stream] += 1  # and the redirected command added nothing: one entry per command
        assert (await deployment.client.xinfo_stream(stream))["entries-added"] == sent[stream]
        result = await deployment.outcome(job["id"])
        assert result.status == "ok" and result.pool == "gpu" and result.output, result
        assert await deployment.results_of(job["id"]) == [shard_of(job["id"], SHARDS)]


async def test_a_faststream_cluster_broker_publishes_jobs_to_every_shard_and_they_complete(
        deployment: Deployment) -> None:
    jobs = [Job(id=f"fs-{i}", model="llama-3.1-8b", kind="completion", prompt="hi", max_tokens=4)
            for i in range(9)]
    assert {shard_of(job.id, SHARDS) for job in jobs} == set(range(SHARDS))
    broker = RedisClusterBroker(f"redis://127.0.0.1:{deployment.port}")
    await broker.connect()
    try:
        for job in jobs:
            await broker.publish(json_encode(job), stream=deployment.topo.of_job(job.id).jobs)
    finally:
        await broker.stop()
    for job in jobs:
        result = await deployment.outcome(job.id)
        assert result.status == "ok" and result.pool == "gpu", result
        assert await deployment.results_of(job.id) == [shard_of(job.id, SHARDS)]


@pytest.mark.parametrize("prefix", ["ib"])  # the example's PREFIX
async def test_the_documented_faststream_cluster_example_runs_as_written(deployment: Deployment,
                                                                         tmp_path: Path) -> None:
    script = tmp_path / "faststream_cluster.py"
    script.write_text(documented_python("RedisClusterBroker"))
    ran = await asyncio.to_thread(subprocess.run, [sys.executable, str(script), f"redis://127.0.0.1:{deployment.port}"],
                                  capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    done = ran.stdout.strip()  # the job's done key, as the example prints it
    job_id = done.rsplit(":", 1)[1]
    assert done == deployment.topo.of_job(job_id).done(job_id)
    result = await deployment.outcome(job_id)
    assert result.status == "ok" and result.output == "[16 tokens from simulated h100 llama-3.1-8b]", result


async def test_a_job_added_to_another_shards_ingress_is_dead_lettered_there_and_runs_on_its_own(
        deployment: Deployment) -> None:
    topo = deployment.topo
    job = Job(id=next(f"wrong-{i}" for i in range(100) if shard_of(f"wrong-{i}", SHARDS) == 1),
              model="llama-3.1-8b", kind="completion", prompt="hi", max_tokens=4)
    await deployment.client.xadd(topo.at(0).jobs, {"job": json_encode(job)})

    async def dead_letter() -> bool:
        return await deployment.client.xlen(topo.at(0).dead) == 1

    await eventually(dead_letter, what="a dead letter on shard 0")
    [(_id, fields)] = await deployment.client.xrange(topo.at(0).dead)
    letter = msgspec.json.decode(fields[b"dead"])
    assert letter["reason"] == "wrong_shard" and topo.at(1).jobs in letter["error"]
    assert not await deployment.client.exists(topo.at(0).done(job.id))  # no result where it does not belong
    # Sent to its own shard, it runs there, once.
    await deployment.client.xadd(topo.of_job(job.id).jobs, {"job": json_encode(job)})
    assert (await deployment.outcome(job.id)).status == "ok"
    assert await deployment.results_of(job.id) == [1]
