"""The live half of the tenants' quotas and fair share (:class:`policies.tenants.TenantLedger`).

The ledger is pure: it learns that a job ended, and how many policy workers share the
limits, from here. A policy worker admits a job and moves on; the job ends at a pool worker
or at another policy worker, so the ledger's shell looks in Redis: an admitted job whose done
key exists has ended (every outcome writes one, docs/reliability.md). Each tick it checks the
oldest few ids still outstanding per tenant and lane, one pipelined ``EXISTS`` each: ids
finish roughly in their lane's order, and the check stays bounded however long the queues.

The limits of a tenant are the deployment's. P policy workers each read about 1/P of the
ingress (one consumer group), so each enforces 1/P of every limit, P counted from the policy
heartbeats that are live.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from broker.heartbeats import fresh, read_beats
from broker.streams import pipeline
from broker.topology import Topology
from broker.wire import decode_policy_heartbeat
from policies.tenants import TenantLedger

CHECKS_PER_LANE = 16
"""Oldest outstanding ids of a tenant checked per lane and tick."""


async def free_finished(client: aioredis.Redis, topo: Topology, ledger: TenantLedger) -> int:
    """Free the ledger's admitted jobs that have ended (their done key exists); how many."""
    checks = [(tenant, job_id) for tenant in ledger.tenants() for job_id in ledger.oldest(tenant, CHECKS_PER_LANE)]
    if not checks:
        return 0
    pipe = pipeline(client)
    for tenant, job_id in checks:
        pipe.exists(topo.of_job(job_id).of_tenant(tenant).done(job_id))
    ended = [check for check, found in zip(checks, await pipe.execute(), strict=True) if found]
    for tenant, job_id in ended:
        ledger.finished(tenant, job_id)
    return len(ended)


async def live_policy_workers(client: aioredis.Redis, topo: Topology, now: float, live_s: float) -> int:
    """Policy workers with a live heartbeat (at least 1: the one asking)."""
    fields = await client.hgetall(topo.policy_heartbeats)  # type: ignore[misc]
    beats = read_beats(fields, decode_policy_heartbeat, topo.policy_heartbeats)
    return max(1, fresh(beats, now, live_s))
