"""The policy worker's decisions: classify and route from the latest snapshot, cheaply.

Deciding anew for every job cost more than the rest of routing, so a decision is reused
for identical jobs (same tenant, model, kind, sizes and hint) while the snapshot stays the
same, if the router allows it (``reusable``: it keeps no state per call). The policy
worker's own routing counts into the snapshot's backlog until the next refresh, so that one
big batch does not pile onto a pool that looked empty at the last one; the router sees it in
steps of 1/16 of the pool's capacity, each step a new snapshot and fresh decisions.

After routing, :meth:`Decider.admit` applies the tenants' quotas and fair share
(:class:`~policies.tenants.TenantLedger`), with the pool counted contended when the job would
queue there in the current snapshot; the simulator admits through the same
:func:`~policies.tenants.contended` and ledger.
"""

from __future__ import annotations

import random

import msgspec

from policies import Decision, JobFeatures, PolicyConfig, PoolState, Snapshot, classify
from policies.router import Router, StaticRouter
from policies.slo import SloRouter, pool_capacity
from policies.tenants import ADMITTED, Admission, TenantLedger, contended, job_tokens

MAX_REMEMBERED = 4096
"""Decisions kept per snapshot: many distinct jobs start the memory afresh."""
STEPS = 16
"""A pool's own routed jobs make a new snapshot every 1/STEPS of its capacity."""


def make_router(config: PolicyConfig) -> Router:
    """The live router named by ``[routing] policy`` (the config admits live routers only)."""
    return StaticRouter(config) if config.routing.policy == "static" else SloRouter(config)


class Decider:
    """Classifies, routes and admits jobs for one policy worker; ``seed`` makes its choices
    reproducible, ``share`` is this worker's share of the tenants' limits (1/P of P workers)."""

    def __init__(self, config: PolicyConfig, router: Router, seed: str, now: float, *, share: float = 1.0) -> None:
        self.config = config
        self.router = router
        self.rng = random.Random(seed)
        self.ledger = TenantLedger(config.tenants, share=share)
        self._decisions: dict[JobFeatures, tuple[str, str, Decision]] = {}
        self._unseen: dict[str, list[int]] = {}
        """Jobs routed to each pool's lanes since the snapshot was taken, not yet counted in it."""
        self._steps: dict[str, int] = {}
        """How many of those make a new snapshot."""
        self.use(Snapshot(now=now))

    def use(self, snapshot: Snapshot) -> None:
        """Decide from ``snapshot`` from now on."""
        self.snapshot = snapshot
        self._unseen = {pool: [0] * self.config.lanes for pool in self.config.pools}
        self._steps = {pool: max(1, pool_capacity(self.config, pool, snapshot.pools.get(pool, PoolState())) // STEPS)
                       for pool in self.config.pools}
        self._decisions.clear()

    def decide(self, features: JobFeatures) -> tuple[str, str, Decision]:
        """Class, reason (classification and routing) and routing decision."""
        hit = self._decisions.get(features)
        if hit is not None:
            return hit
        slo, why = classify(features, self.config)
        decision = self.router.decide(features, slo, self.snapshot, self.rng)
        made = (slo, f"{why}; {decision.reason}", decision)
        if getattr(self.router, "reusable", False):  # a stateful router must see every job
            if len(self._decisions) >= MAX_REMEMBERED:
                self._decisions.clear()
            self._decisions[features] = made
        return made

    def routed(self, pool: str, lane: int) -> None:
        """Count one job this worker routed to ``pool``'s ``lane``."""
        unseen = self._unseen[pool]
        unseen[lane] += 1
        if sum(unseen) >= self._steps[pool]:
            state = self.snapshot.pools.get(pool, PoolState())
            for i, n in enumerate(unseen):
                state = state.routed(i, n) if n else state
            self.use(msgspec.structs.replace(self.snapshot, pools={**self.snapshot.pools, pool: state}))

    def admit(self, features: JobFeatures, job_id: str, pool: str, lane: int, now: float) -> Admission:
        """Admit (and count) or refuse a job routed to ``pool``'s ``lane`` under its tenant's
        quotas and fair share; a refusal carries its reason and ``retry_after_s``. A job of a tenant
        without limits (every job of a deployment without tenants) costs one lookup."""
        if features.tenant not in self.config.tenants:
            return ADMITTED
        return self.ledger.admit(features.tenant, job_id, job_tokens(features), now, lane=lane,
                                 contended=contended(self.config, self.snapshot, pool, lane))

    def finished(self, tenant: str, job_id: str) -> bool:
        """Free an admitted job of ``tenant`` (its result exists); False: it was not outstanding."""
        return self.ledger.finished(tenant, job_id)
