"""Heartbeats are typed messages: what the roles write decodes as their Structs, with the field
names readers of earlier versions know, and a field that is not a heartbeat is skipped by
every reader (the policy's snapshot, the janitor, ``top``, the stack's readiness wait)."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import pytest
import redis.asyncio as aioredis

from broker.client import Client
from broker.config import load_config
from broker.policy_worker import PolicyWorker
from broker.settings import Settings
from broker.topology import WORKER_GROUP
from broker.wire import Heartbeat, Job, decode_heartbeat, decode_policy_heartbeat, json_encode
from cli.stack import wait_for_roles
from cli.top import Collector
from tests.helpers import eventually
from workers.factory import make_backend
from workers.worker import PoolWorker

OLD_WORKER_FIELDS = {"ts", "in_flight", "capacity", "seq", "obs", "cooling_until"}
OLD_POLICY_FIELDS = {"ts", "routed", "dead"}
"""What beats held before they were Structs, and what readers of that version index."""

MALFORMED = {
    b"garbled": b"{not json",
    b"untyped": json_encode({"ts": time.time(), "in_flight": "three", "capacity": 8}),
    b"negative": json_encode({"ts": time.time(), "in_flight": 0, "capacity": -4}),
    b"no-ts": json_encode({"in_flight": 0, "capacity": 4}),
    b"bad-obs": json_encode({"ts": time.time(), "in_flight": 0, "capacity": 4, "seq": 1, "obs": [{"model": "m"}]}),
    b"\x1b[31mspoof\n": b"[]",
}
"""Fields another writer might leave in a heartbeat hash; the last one's name is a terminal escape."""


def fresh_beat() -> bytes:
    return json_encode(Heartbeat(ts=time.time(), in_flight=1, capacity=4, seq=1))


async def test_the_beats_real_roles_write_decode_as_their_structs(settings: Settings, client: aioredis.Redis) -> None:
    config = load_config()
    topo = settings.topology
    policy = PolicyWorker(client, settings, config)
    worker = PoolWorker(client, settings, "gpu", make_backend(config.pools["gpu"]), concurrency=4,
                        lanes=config.lanes, shares=config.lane_shares)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(policy.run(stop)), asyncio.create_task(worker.run(stop))]
    seen: dict[str, bytes] = {}

    async def reported() -> bool:
        """A worker beat with the job's timings, and a policy beat that counts its routing."""
        for raw in await client.hvals(topo.heartbeats("gpu")):  # type: ignore[misc]
            if decode_heartbeat(raw).obs:
                seen["worker"] = raw
        for raw in await client.hvals(topo.policy_heartbeats):  # type: ignore[misc]
            if decode_policy_heartbeat(raw).routed:
                seen["policy"] = raw
        return len(seen) == 2

    try:
        async with Client(settings.redis_url or "", prefix=settings.prefix) as sdk:
            # Only the gpu pool serves embeddings: routed there whether or not the policy has seen the worker yet.
            done = await sdk.run(Job(id="beat-1", model="minilm-l6", kind="embedding", texts=["hi"]), timeout=30)
        assert done.status == "ok" and done.pool == "gpu", done
        await eventually(reported, timeout=10, what="beats that report the job")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
    beat = decode_heartbeat(seen["worker"])
    (obs,) = beat.obs
    assert (obs.model, obs.prompt_tokens, obs.concurrency) == ("minilm-l6", done.usage.prompt_tokens, 1)
    assert beat.capacity == 4 and beat.seq >= 1 and beat.v == 1 and beat.ts <= time.time()
    assert decode_policy_heartbeat(seen["policy"]).routed == 1
    # Readers of the version before the Structs index these names: a rolling upgrade keeps working.
    assert OLD_WORKER_FIELDS <= set(msgspec.json.decode(seen["worker"]))
    assert OLD_POLICY_FIELDS <= set(msgspec.json.decode(seen["policy"]))


async def test_a_malformed_heartbeat_is_skipped_by_every_reader(
        redis_url: str, prefix: str, client: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    # Short claim idle time: the janitor looks at the beat of a consumer idle for 2 x that.
    settings = Settings(redis_url=redis_url, prefix=prefix, block_ms=100, claim_idle_ms=150, heartbeat_s=0.2)
    topo = settings.topology
    config = load_config()
    key = topo.heartbeats("gpu")
    await client.hset(key, mapping={b"live": fresh_beat(), **MALFORMED})
    await client.hset(topo.policy_heartbeats, mapping={b"policy-live": json_encode({"ts": time.time()}),
                                                       b"policy-garbled": b"\xff"})
    policy = PolicyWorker(client, settings, config)

    caplog.set_level(logging.WARNING, "inference_broker.heartbeats")
    for _ in range(2):
        await policy.refresh()
    gpu = policy.snapshot.pools["gpu"]
    assert (gpu.workers, gpu.in_flight, gpu.capacity) == (1, 1, 4)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == len(MALFORMED), warnings  # each once, though read twice
    assert any("ignoring heartbeat garbled in" in w for w in warnings)
    assert any("\\x1b[31mspoof\\n" in w for w in warnings) and not any("\x1b" in w for w in warnings)

    # top shows the live worker and counts the rest as stale.
    frame = await Collector(client, settings, config).frame()
    (view,) = [p for p in frame.pools if p.name == "gpu"]
    assert ([w.name for w in view.workers], view.stale, frame.policies) == (["live"], len(MALFORMED), 1)

    # The janitor removes an idle consumer whose beat does not decode (it is no sign of
    # life), and keeps one with a fresh beat.
    stream = topo.pool("gpu")
    await client.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
    for name in (b"live", b"garbled"):
        await client.xgroup_createconsumer(stream, WORKER_GROUP, name)

    async def idle() -> bool:
        consumers = await client.xinfo_consumers(stream, WORKER_GROUP)
        return all(c["idle"] > 2 * settings.claim_idle_ms for c in consumers)

    await eventually(idle, timeout=5, what="both consumers idle past the janitor's limit")
    await client.hset(key, b"live", fresh_beat())
    await policy.janitor.remove_dead_consumers(time.time())
    assert [c["name"] for c in await client.xinfo_consumers(stream, WORKER_GROUP)] == [b"live"]

    # The local stack's readiness wait counts the live roles only.
    await asyncio.to_thread(wait_for_roles, redis_url, topo, {"gpu": 1}, timeout=5)
    with pytest.raises(Exception, match="no fresh heartbeat from gpu"):
        await asyncio.to_thread(wait_for_roles, redis_url, topo, {"gpu": 2}, timeout=0.3)
