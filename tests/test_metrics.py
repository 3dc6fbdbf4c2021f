"""Prometheus metrics and health endpoints of real role processes.

A short workload with every kind of outcome (served, shed, expired before routing, a
poison job, an undecodable entry) goes through a policy worker and two pool workers, each
serving its endpoint on a port of its own; the counters and histograms scraped from them
must account for every job exactly once. A role whose Redis goes away must say it is not
ready within seconds, and ready again once Redis is back.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.client import Client
from broker.config import default_config_text
from broker.metrics import MAX_CLASSES, PoolMetrics
from broker.topology import Topology
from broker.wire import ChatMessage, Job
from cli.embedded import EmbeddedRedis, free_port
from cli.httpd import Readiness, RoleServer
from tests.conftest import FAST_ENV, Roles, _start
from tests.helpers import ACCEL_JOB, eventually, mixed_jobs, warm_up

CONFIG = default_config_text() + '''
[classes.instant]
ttft_ms = 1
'''
# Label names our metrics may carry: all bounded (no job id, no consumer name).
LABELS = {"class", "pool", "stream", "reason", "role", "le"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """(status, body) of an HTTP request to a role's endpoint on this host."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def scrape(port: int) -> Samples:
    """Every ``inference_broker_*`` sample a role exposes, by (name, labels)."""
    status, text = await asyncio.to_thread(get, port, "/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) if family.name.startswith("inference_broker_")
            for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def is_ready(port: int) -> bool:
    try:
        return (await asyncio.to_thread(get, port, "/readyz"))[0] == 200
    except OSError:
        return False  # not listening yet


def by(samples: Samples, name: str, *keys: str) -> Counter[tuple[str, ...]]:
    out: Counter[tuple[str, ...]] = Counter()
    for (n, ls), v in samples.items():
        if n == name and v:
            labels = dict(ls)
            out[tuple(labels[k] for k in keys)] += int(v)
    return out


async def test_counters_and_histograms_account_for_every_job(
        roles: Roles, redis_url: str, prefix: str, client: aioredis.Redis, tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(CONFIG)
    env = {**FAST_ENV, "IB_CONFIG": str(config)}
    ports = {"policy": free_port(), "gpu": free_port(), "accel": free_port()}
    roles.start("policy", "--metrics-port", str(ports["policy"]), env=env)
    roles.start("worker", "--pool", "gpu", "--metrics-port", str(ports["gpu"]), env=env)
    roles.start("worker", "--pool", "accel", "--metrics-port", str(ports["accel"]), env=env)
    topo = Topology(prefix)
    for role, port in ports.items():  # as compose does before it starts the producer
        await eventually(lambda port=port: is_ready(port), timeout=20, what=f"{role} to be ready")

    chat = [ChatMessage("user", "hi")]
    warm = {"gpu": Job(id="warm-gpu", model="llama-3.1-8b", messages=chat, max_tokens=4), "accel": ACCEL_JOB}
    served = [*warm.values(), *mixed_jobs(24, tag="m")]
    shed = [Job(id=f"shed-{i}", model="llama-3.1-8b", messages=chat, slo="instant") for i in range(3)]
    expired = [Job(id=f"late-{i}", model="llama-3.1-8b", messages=chat, max_tokens=4, deadline=time.time() - 60)
               for i in range(2)]
    poison = Job(id="poison", model="llama-3.1-8b", kind="completion", prompt="p", max_tokens=4,
                 metadata={"fault": "permanent"})
    jobs = [*served, *shed, *expired, poison]
    async with Client(redis_url, prefix=prefix) as sdk:
        # Admission refuses nothing on a pool that has finished no job: one runs on each first.
        results = {r.id: r for r in await warm_up(sdk, client, topo, warm)}
        await sdk.submit_many(jobs[len(warm):])
        await client.xadd(topo.jobs, {"job": b"not a job"})  # an entry the policy can only dead-letter
        results |= {j.id: await sdk.result(j.id, timeout=30) for j in jobs[len(warm):]}
    assert [results[j.id].status for j in shed] == ["rejected"] * 3
    assert [results[j.id].status for j in expired] == ["expired"] * 2
    assert results["poison"].status == "failed"
    ok = [r for r in results.values() if r.status == "ok"]
    assert len(ok) == len(served)

    # The counters move just after the result is published: wait for the last ones.
    async def settled() -> bool:
        policy, gpu, accel = [await scrape(ports[k]) for k in ("policy", "gpu", "accel")]
        done = sum(total(s, "inference_broker_jobs_completed_total") for s in (gpu, accel))
        return done == len(ok) and total(policy, "inference_broker_jobs_dead_lettered_total") == 1

    await eventually(settled, timeout=10, what="the counters to settle")
    policy = await scrape(ports["policy"])
    workers = {pool: await scrape(ports[pool]) for pool in ("gpu", "accel")}
    both = {k: v for samples in workers.values() for k, v in samples.items()}

    # The policy accounted for every entry it took: routed, shed, expired, or dead-lettered.
    routed = total(policy, "inference_broker_jobs_routed_total")
    assert by(policy, "inference_broker_jobs_shed_total", "class") == {("instant",): 3}
    assert by(policy, "inference_broker_jobs_expired_total", "class", "pool") == {("interactive", "none"): 2}
    assert by(policy, "inference_broker_jobs_dead_lettered_total", "class", "reason") == {("none", "decode_error"): 1}
    assert routed == len(served) + 1  # the poison job was routed too
    routed_to = by(policy, "inference_broker_jobs_routed_total", "pool")
    assert sum(routed_to.values()) == routed

    # The workers accounted for every job routed to them.
    for pool, samples in workers.items():
        finished = (total(samples, "inference_broker_jobs_completed_total")
                    + total(samples, "inference_broker_jobs_dead_lettered_total")
                    + total(samples, "inference_broker_jobs_expired_total"))
        assert finished == routed_to[(pool,)], pool
    assert by(both, "inference_broker_jobs_dead_lettered_total", "reason") == {("backend_error",): 1}
    assert total(both, "inference_broker_jobs_failed_total") == 1  # not retryable: one attempt
    assert total(both, "inference_broker_jobs_retried_total") == 0

    # The sum: everything taken in ended as exactly one outcome.
    outcomes = {name: sum(total(s, f"inference_broker_jobs_{name}_total") for s in (policy, both))
                for name in ("completed", "dead_lettered", "shed", "expired")}
    assert routed + outcomes["shed"] + 2 + 1 == len(jobs) + 1  # + expired before routing, + the bad entry
    assert sum(outcomes.values()) == len(jobs) + 1

    # Completed jobs and histogram counts per (class, pool) are the ok results.
    per_class = Counter((r.slo or "", r.pool or "") for r in ok)
    assert by(both, "inference_broker_jobs_completed_total", "class", "pool") == per_class
    for hist in ("queue_time_seconds", "time_to_first_token_seconds", "e2e_latency_seconds"):
        assert by(both, f"inference_broker_{hist}_count", "class", "pool") == per_class, hist
        inf = {k: v for k, v in by(both, f"inference_broker_{hist}_bucket", "class", "pool", "le").items()
               if k[2] == "+Inf"}
        assert {k[:2]: v for k, v in inf.items()} == per_class, hist
    multi = Counter((r.slo or "", r.pool or "") for r in ok if r.usage.completion_tokens >= 2)
    assert by(both, "inference_broker_time_per_output_token_seconds_count", "class", "pool") == multi
    e2e = sum(r.metrics.e2e_latency_ms for r in ok if r.metrics) / 1000
    assert total(both, "inference_broker_e2e_latency_seconds_sum") == pytest.approx(e2e, rel=1e-6)
    met = Counter((r.slo or "", r.pool or "") for r in ok if r.slo_met)
    assert by(both, "inference_broker_slo_met_total", "class", "pool") == met

    # Gauges: capacity, cost, backlog drained, every role ready.
    assert total(workers["gpu"], "inference_broker_worker_capacity", pool="gpu") == 64
    assert total(workers["accel"], "inference_broker_cost_rate_dollars_per_hour", pool="accel") == 20.0
    assert total(policy, "inference_broker_stream_backlog", stream="jobs") == 0
    assert total(policy, "inference_broker_stream_length", stream="dead") == 2
    assert total(policy, "inference_broker_pool_workers", pool="gpu") == 1
    for samples in (policy, *workers.values()):
        assert total(samples, "inference_broker_ready") == 1 and total(samples, "inference_broker_redis_up") == 1

    # Bounded labels only: no job id anywhere.
    ids = {j.id for j in jobs}
    for samples in (policy, *workers.values()):
        for _name, labels in samples:
            assert {k for k, _v in labels} <= LABELS, labels
            assert not ids & {v for _k, v in labels}, labels

    # The other paths of the endpoint.
    for role, port in ports.items():
        status, body = await asyncio.to_thread(get, port, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "alive", role
        status, body = await asyncio.to_thread(get, port, "/readyz")
        assert status == 200 and json.loads(body) == {"ready": True, "role": json.loads(body)["role"],
                                                      "reason": "ok"}, body
    assert (await asyncio.to_thread(get, ports["gpu"], "/nope"))[0] == 404
    assert (await asyncio.to_thread(get, ports["gpu"], "/metrics", "POST"))[0] == 405
    assert (await asyncio.to_thread(get, ports["gpu"], "/readyz", "HEAD"))[0] == 200


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[list[EmbeddedRedis]]:
    """Redis servers this test starts and restarts (AOF on); stopped at teardown."""
    servers: list[EmbeddedRedis] = [_start(directory=tmp_path / "data", port=free_port())]
    yield servers
    for server in servers:
        server.stop()


async def test_a_role_whose_redis_goes_away_is_not_ready_within_seconds_and_recovers(
        own_redis: list[EmbeddedRedis], prefix: str, tmp_path: Path) -> None:
    server = own_redis[0]
    port = free_port()
    roles = Roles(server.url, prefix, tmp_path)
    worker = roles.start("worker", "--pool", "gpu", "--metrics-port", str(port), env=FAST_ENV)
    try:
        async def ready() -> bool:
            assert worker.poll() is None, roles.logs()
            return await is_ready(port)

        await eventually(ready, timeout=20, what="the worker to be ready")

        server.kill()
        gone = time.monotonic()

        async def not_ready() -> bool:
            return (await asyncio.to_thread(get, port, "/readyz"))[0] == 503

        await eventually(not_ready, timeout=5, what="the worker to report not ready")
        assert time.monotonic() - gone < 5
        status, body = await asyncio.to_thread(get, port, "/readyz")
        assert status == 503 and json.loads(body)["ready"] is False
        assert "Redis" in json.loads(body)["reason"], body
        assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200  # alive all the same
        samples = await scrape(port)
        assert total(samples, "inference_broker_redis_up") == 0 and total(samples, "inference_broker_ready") == 0

        back = EmbeddedRedis(port=server.port, directory=server.directory)
        own_redis.append(back)
        await asyncio.to_thread(back.start)
        await eventually(ready, timeout=15, what="the worker to be ready again")
        assert worker.poll() is None  # it rode the outage out
    finally:
        roles.stop_all()


def test_stray_class_names_do_not_grow_the_series() -> None:
    # A job written to a pool stream by hand can name any class: past MAX_CLASSES they are "other".
    pool = f"unit-{uuid.uuid4().hex[:6]}"
    metrics = PoolMetrics(pool)
    for i in range(3 * MAX_CLASSES):
        metrics.of(f"c{i}").complete(1.0, 2.0, None, 3.0, True)
        metrics.dead(f"c{i}", "invalid_job").inc()
    samples = [s for f in text_string_to_metric_families(generate_latest(REGISTRY).decode()) for s in f.samples
               if s.labels.get("pool") == pool and s.name == "inference_broker_jobs_completed_total"]
    assert len(samples) == MAX_CLASSES + 1
    assert {s.labels["class"]: s.value for s in samples}["other"] == 2 * MAX_CLASSES


async def test_the_endpoint_refuses_what_is_not_a_request(redis_url: str) -> None:
    server = await RoleServer(Readiness(redis_url, [], role="unit"), "unit").start("127.0.0.1", 0)
    try:
        await eventually(lambda: is_ready(server.port), timeout=5, what="a first probe")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"hello\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metr")  # and hang up: the server carries on
        writer.close()
        assert (await asyncio.to_thread(get, server.port, "/healthz"))[0] == 200
    finally:
        await server.aclose()
