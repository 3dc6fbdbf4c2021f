"""Entry points of the long-running roles: connect, run until a signal, exit cleanly.

SIGTERM and SIGINT set a stop event: a role stops reading, lets running work finish
(within the grace period for workers) and exits 0, in a bounded time whatever Redis does
(``broker.streams.STOP_TIMEOUT_S``). uvloop is installed here, in the entry
point, and nowhere else.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable

from broker.config import load_config
from broker.connection import connect, redacted, wait_ready
from broker.metrics import COST_RATE, ROLE
from broker.policy_worker import PolicyWorker
from broker.settings import Settings
from broker.streams import briefly
from broker.topology import POLICY_GROUP, WORKER_GROUP
from cli.httpd import role_endpoint
from policies.profiles import PROFILES

log = logging.getLogger("inference_broker")


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` on uvloop (when installed) until it returns; signals set ``stop``."""

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    steady_gc()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(wrapper())
    else:
        uvloop.run(wrapper())


def steady_gc() -> None:
    """Keep the cyclic garbage collector off the hot path of a long-running role.

    Everything loaded at startup (modules, config) is moved out of the collector's reach,
    and young collections run every 10,000 net allocations instead of 700. Per-job objects
    are freed by reference counting; with the defaults, the collector still ran about 50
    times a second under load, re-scanning the startup heap, and took a fifth of a pool
    worker's CPU (bench/PROFILE.md, round 3).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


async def serve_policy(settings: Settings, stop: asyncio.Event, name: str | None = None) -> None:
    """The policy worker role (with its HTTP endpoint when ``settings.metrics_port`` is set)."""
    assert settings.redis_url is not None
    config = load_config(settings.config)
    ROLE.info({"role": "policy", "pool": ""})
    groups = [group for topo in settings.topology.every_shard for group in (
        (topo.jobs, POLICY_GROUP),
        *((topo.pool(p, lane), WORKER_GROUP) for p in config.pools for lane in range(config.lanes)))]
    client = connect(settings.redis_url, settings.block_ms)
    try:
        worker = PolicyWorker(client, settings, config, name=name)
        async with role_endpoint(settings, "policy", groups, stop, hooks=[worker.export_gauges]):
            await wait_ready(client, settings.redis_url)
            log.info("policy worker %s on %s, pools %s", worker.name, redacted(settings.redis_url),
                     ", ".join(config.pools))
            await worker.run(stop)
            log.info("policy worker %s stopped after routing %d jobs", worker.name, worker.counts.routed)
    finally:
        await briefly(client.aclose(), "close the connections to Redis")


async def serve_worker(settings: Settings, stop: asyncio.Event, pool: str, *,
                       concurrency: int | None = None, name: str | None = None) -> None:
    """A pool worker role with the pool's configured backend (simulated, OpenAI-compatible HTTP, ...)."""
    from workers.factory import BackendUnavailable, make_backend
    from workers.sandbox import Sandboxes
    from workers.worker import PoolWorker

    assert settings.redis_url is not None
    config = load_config(settings.config)
    if pool not in config.pools:
        raise SystemExit(f"error: pool {pool!r} is not configured; configured pools: {', '.join(config.pools)}")
    spec = config.pools[pool]
    cap = PROFILES[spec.profile].max_concurrency
    if concurrency is not None and cap is not None and concurrency > cap:
        raise SystemExit(f"error: --concurrency {concurrency} exceeds the {spec.profile!r} device cap of {cap}")
    try:
        backend = make_backend(spec, faults=settings.fault_injection)
    except BackendUnavailable as exc:
        raise SystemExit(f"error: pool {pool!r}: {exc}") from None
    ROLE.info({"role": "worker", "pool": pool})
    COST_RATE.labels(pool).set(spec.cost_per_hour)
    groups = [(topo.pool(pool, lane), WORKER_GROUP) for topo in settings.topology.every_shard
              for lane in range(config.lanes)]
    # Processes start only when a suspect needs one (see workers.sandbox).
    sandboxes = Sandboxes(spec, slots=settings.sandboxes, faults=settings.fault_injection) \
        if settings.sandboxes > 0 else None
    client = connect(settings.redis_url, settings.block_ms)
    try:
        async with role_endpoint(settings, f"worker {pool}", groups, stop):
            await wait_ready(client, settings.redis_url)
            warm_up = getattr(backend, "load", None)
            if warm_up is not None:
                # An in-process model loads before the worker joins, not under its first jobs'
                # deadlines; meanwhile it sends no heartbeat, so the policy does not count it yet
                # (nor is it ready: its groups are created when it starts reading).
                log.info("pool %s: loading %s", pool, backend.name)
                await warm_up()
            worker = PoolWorker(client, settings, pool, backend, concurrency=concurrency or spec.concurrency,
                                lanes=config.lanes, shares=config.lane_shares, name=name, sandboxes=sandboxes)
            log.info("worker %s: pool %s, %s, concurrency %d", worker.name, pool, backend.name,
                     worker.concurrency)
            await worker.run(stop)
            log.info("worker %s stopped after %d jobs", worker.name, worker.outcomes.completed)
    finally:
        if sandboxes is not None:
            await sandboxes.aclose()
        await backend.aclose()
        await briefly(client.aclose(), "close the connections to Redis")
