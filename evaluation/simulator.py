"""A discrete-event simulator of the broker on a virtual clock: same routers, simulated pools.

Each job arrives, is classified (:func:`policies.classify.classify`) and routed by the
:class:`~policies.router.Router` under test from a :class:`~policies.route.Snapshot` of the
pools, then waits in its pool's queue until a worker has a free slot; the pools, their
devices and queues are :mod:`evaluation.pools`, what a run is told :mod:`evaluation.options`,
what it produces :mod:`evaluation.records` (read by :mod:`evaluation.metrics` and
:mod:`evaluation.goodput`). This module is the engine: the clock, arrivals, snapshots,
observations and faults.

**Tenants.** With ``[tenants.<name>]`` in the config, a routed job is then admitted as the
policy worker admits it (``broker.decider.Decider.admit``): by a
:class:`~policies.tenants.TenantLedger`, its pool contended when the job would queue in the
snapshot the router saw (:func:`~policies.tenants.contended`); a refusal is a ``rejected``
record with the ledger's reason and ``retry_after_s``, and every finished job frees its slot.

The snapshot mirrors the policy worker's: ``backlog`` is queued plus running (the pool
streams' lag plus pending), ``queued`` the waiting jobs by lane (each lane stream's lag),
``capacity`` is workers times slots. It is exact at every
decision by default; with ``snapshot_interval_s`` it is refreshed on a clock that often and,
between refreshes, counts the simulator's own routing into the backlog, as the live worker does.
The router learns from an :class:`~policies.router.Observation` the moment a job finishes, or,
with ``observation_interval_s``, in batches that often (live: with each worker heartbeat).

**Truth and belief.** ``SimOptions.truth`` makes a pool's devices differ from the profiles the
router believes (:class:`~evaluation.options.DeviceTruth`); the router must learn the difference
from its observations. ``SimOptions.failures`` kills workers (:class:`~evaluation.options.Failure`)
as the live stack loses them: their running jobs stay pending and are run again from the start by
a live peer of the pool ``reclaim_s`` later (the live claim timeout), the snapshot keeps counting
the dead workers for ``heartbeat_lag_s`` (until their heartbeats are too old), queued jobs wait
for a live worker, and a recovery brings the same workers back empty.

The offline reference (:class:`~evaluation.baselines.OracleRouter`) gets the truth through its
``truth`` hook: the job being decided, run forward on a copy of each candidate pool
(:mod:`evaluation.lookahead`).

Events live in one heap per pool, so a minute of thousands of jobs takes a fraction of a
second per policy. Randomness: the workload draws from ``SeededRandom(seed)``, the router from
``SeededRandom(seed, stream=1)``, so every router sees the same jobs; the devices' per-job luck
(``DeviceTruth``) comes from ``stream=2``, drawn at arrival, so every router and pool sees the
same luck for the same job.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence

import msgspec

from evaluation.baselines import OracleRouter, OracleTruth
from evaluation.lookahead import look_ahead
from evaluation.options import DEFAULT_OPTIONS, Failure, SimOptions
from evaluation.pools import Finished, SimJob, SimPool
from evaluation.records import JobRecord, PoolUsage, SimResult, Status, meets
from evaluation.workloads import Arrival, SeededRandom, Workload, generate
from policies.classify import classify
from policies.config import PolicyConfig
from policies.route import JobFeatures, PoolState, Snapshot
from policies.router import Observation, Router
from policies.tenants import TenantLedger, contended, job_tokens


class _Run:
    """The state of one simulation; :func:`simulate` is the way in."""

    def __init__(self, config: PolicyConfig, router: Router, fleet: Mapping[str, int], options: SimOptions,
                 rng: SeededRandom, luck: SeededRandom | None = None) -> None:
        unknown = sorted(set(fleet) - set(config.pools))
        if unknown:
            raise ValueError(f"fleet names pools {unknown} that the config lacks (pools: {sorted(config.pools)})")
        if any(n < 0 for n in fleet.values()):
            raise ValueError(f"fleet sizes must be >= 0: {dict(fleet)}")
        self.config, self.router, self.options, self.rng = config, router, options, rng
        named = sorted({*options.truth, *(f.pool for f in options.failures)} - set(config.pools))
        if named:
            raise ValueError(f"SimOptions names pools {named} that the config lacks (pools: {sorted(config.pools)})")
        self.pools = {name: SimPool(name, spec, fleet.get(name, 0), config.lane_shares, options.priority_queues,
                                   options.decode_chunk, options.truth.get(name), options.heartbeat_lag_s)
                      for name, spec in config.pools.items()}
        self.luck = luck
        """Per-job draws for the devices' noise and tails; None when no pool's truth has any."""
        self.faults: list[tuple[float, int, Callable[[], None]]] = []
        """Failures, recoveries and reclaims to come, by (time, sequence)."""
        self.fault_seq = 0
        for failure in options.failures:
            self._fault(failure.at_s, self._failure(failure))
        for pool in self.pools.values():
            pool.on_finish = self._finished(pool)
        self.records: dict[int, JobRecord] = {}
        self.snapshot: Snapshot | None = None
        self.snapshot_at = -math.inf
        self.now = 0.0
        self.events = 0
        self.pending: list[Observation] = []
        self.observed_at = 0.0
        self.current: SimJob | None = None
        self.ledger = TenantLedger(config.tenants) if config.tenants else None
        if isinstance(router, OracleRouter):
            router.truth = self.truth

    def _fault(self, at: float, action: Callable[[], None]) -> None:
        self.fault_seq += 1
        heapq.heappush(self.faults, (at, self.fault_seq, action))

    def _failure(self, failure: Failure) -> Callable[[], None]:
        pool = self.pools[failure.pool]

        def fail() -> None:
            lost = [*pool.lost]
            dead = pool.kill(self.now, failure.workers)
            taken = [j for j in pool.lost if j not in lost]
            if taken:
                self._fault(self.now + self.options.reclaim_s, lambda: pool.reclaim(self.now, taken))
            if dead and failure.recover_at_s is not None:
                self._fault(failure.recover_at_s, lambda: pool.revive(self.now, dead))
        return fail

    def _stranded(self) -> bool:
        """Whether jobs wait on something only a fault event brings (a reclaim, a recovery)."""
        return any(p.queued or p.lost for p in self.pools.values())

    def _snapshot(self) -> Snapshot:
        if self.pending and self.now - self.observed_at >= self.options.observation_interval_s:
            for obs in self.pending:
                self.router.observe(obs)
            self.pending.clear()
            self.observed_at = self.now
        if self.snapshot is None or self.options.snapshot_interval_s <= 0:
            self._refresh()
        assert self.snapshot is not None
        return self.snapshot

    def _refresh(self) -> None:
        self.snapshot = Snapshot(now=self.now, pools={n: p.state(self.now) for n, p in self.pools.items()})
        self.snapshot_at = self.now

    def _count_routed(self, pool: str, lane: int) -> None:
        # Between refreshes the live policy worker adds its own routing to the backlog.
        if self.options.snapshot_interval_s > 0 and self.snapshot is not None:
            state = self.snapshot.pools.get(pool, PoolState())
            pools = {**self.snapshot.pools, pool: state.routed(lane)}
            self.snapshot = msgspec.structs.replace(self.snapshot, pools=pools)

    def arrive(self, i: int, arrival: Arrival) -> None:
        job = arrival.features
        cls, _why = classify(job, self.config)
        luck = (0.0, 1.0) if self.luck is None else (self.luck.gauss(0.0, 1.0), self.luck.random())
        run = SimJob(i, arrival.at, job, cls, self.config.lane(cls), luck)
        self.current = run
        snapshot = self._snapshot()
        decision = self.router.decide(job, cls, snapshot, self.rng)
        self.current = None
        run.predicted = decision.predicted_ttft_ms
        if decision.shed:
            self._close(run, "rejected", decision.reason, retry_after_s=decision.retry_after_s)
            return
        if decision.pool is None or decision.pool not in self.pools:
            self._close(run, "failed", decision.reason if decision.pool is None else f"no pool {decision.pool!r}")
            return
        pool = self.pools[decision.pool]
        run.model = pool.profile.model(job.model)
        if run.model is None or job.kind not in pool.spec.kinds:
            # Live, the worker's backend refuses it (a permanent error): a failed result.
            self._close(run, "failed", f"{pool.name} cannot run {job.kind} on {job.model}", pool=pool.name)
            return
        if self.ledger is not None:  # after routing, as the policy worker admits
            busy = contended(self.config, snapshot, pool.name, run.lane)
            admission = self.ledger.admit(job.tenant, str(i), job_tokens(job), self.now, contended=busy, lane=run.lane)
            if not admission.admitted:
                self._close(run, "rejected", admission.reason, retry_after_s=admission.retry_after_s)
                return
        self._count_routed(pool.name, run.lane)
        pool.push(run)
        pool.dispatch(self.now)

    def _finished(self, pool: SimPool) -> Finished:
        def done(job: SimJob, now: float, tokens: int) -> None:
            self._close(job, "ok", "", pool=pool.name, tokens=tokens, now=now)
            if self.ledger is not None:
                self.ledger.finished(job.job.tenant, str(job.i))
            first = now if job.first is None else job.first
            obs = Observation(
                pool=pool.name, model=job.job.model, prompt_tokens=job.job.prompt_tokens, output_tokens=tokens,
                concurrency=job.concurrency, ttft_ms=(first - job.start) * 1000,
                tpot_ms=(now - first) * 1000 / (tokens - 1) if tokens > 1 else None, at=now)
            if self.options.observation_interval_s > 0:
                self.pending.append(obs)
            else:
                self.router.observe(obs)
        return done

    def _close(self, job: SimJob, status: Status, reason: str, *, pool: str | None = None, tokens: int = 0,
               now: float | None = None, retry_after_s: float | None = None) -> None:
        f, started = job.job, job.worker is not None
        rec = JobRecord(
            id=job.i, cls=job.cls, tenant=f.tenant, model=f.model, kind=f.kind, prompt_tokens=f.prompt_tokens,
            max_tokens=f.max_tokens, arrival=job.arrival, status=status, reason=reason, pool=pool,
            worker=job.worker.index if job.worker is not None else None, start=job.start if started else None,
            first_token=job.first, finish=now if status == "ok" else None, output_tokens=tokens,
            concurrency=job.concurrency, cost_usd=job.cost, predicted_ttft_ms=job.predicted,
            attempts=max(1, job.attempts), retry_after_s=retry_after_s)
        self.records[job.i] = msgspec.structs.replace(rec, slo_met=meets(self.config.classes[job.cls], rec))

    def run(self, arrivals: Sequence[Arrival], stop: float) -> float:
        pools = list(self.pools.values())
        n, i = len(arrivals), 0
        interval = self.options.snapshot_interval_s
        while True:
            nxt: SimPool | None = None
            t = math.inf
            for p in pools:
                if p.events and p.events[0][0] < t:
                    nxt, t = p, p.events[0][0]
            at = arrivals[i].at if i < n else math.inf
            # A lagged snapshot is refreshed on a clock, as the live policy worker's is: a
            # decision sees the pools as they were at the last tick, not at its own instant.
            tick = self.snapshot_at + interval if interval > 0 and self.snapshot is not None else math.inf
            fault = self.faults[0][0] if self.faults else math.inf
            # A fault goes first at its instant; once nothing else is due it still matters
            # while jobs wait for it (a reclaim, a recovery), and not after.
            if fault < math.inf and fault <= min(t, at, tick, stop) and (min(t, at) < math.inf or self._stranded()):
                self.now = fault
                heapq.heappop(self.faults)[2]()
            elif tick < min(t, at) < math.inf and tick <= stop:
                self.now = tick
                self._refresh()
            elif nxt is not None and t <= at:
                if t > stop:
                    self.now = stop
                    break
                self.now = nxt.step()
                self.events += 1
            elif i < n:
                self.now = at
                self.arrive(i, arrivals[i])
                i += 1
            else:
                break
        return self.now

    def leftovers(self) -> None:
        """Close every job still queued or running when the loop stopped."""
        for pool in self.pools.values():
            while pool.queued:
                self._close(pool.pop(), "unfinished", f"still queued on {pool.name} at the end", pool=pool.name)
            for _, _, _, job in pool.events:
                if job.i not in self.records:
                    self._close(job, "unfinished", "still running at the end", pool=pool.name)
            for job in pool.lost:
                self._close(job, "unfinished", f"lost with its worker on {pool.name}, not reclaimed by the end",
                            pool=pool.name)
            for w in pool.workers:
                if w.in_flight:
                    w.busy_s += self.now - w.busy_since

    # ----------------------------------------------------------------------------- the oracle's truth

    def truth(self, features: JobFeatures, pool_name: str, snapshot: Snapshot) -> OracleTruth | None:
        """What would really happen to the job being decided on ``pool_name``, from a copy run forward."""
        cur, pool = self.current, self.pools.get(pool_name)
        if cur is None or pool is None or features.model != cur.job.model:
            return None
        model = pool.profile.model(features.model)
        if model is None or features.kind not in pool.spec.kinds:
            return None
        job = SimJob(cur.i, cur.arrival, features, cur.cls, cur.lane, cur.luck)
        job.model, job.own = model, True
        return look_ahead(pool, job, self.now, self.config.classes[cur.cls].ttft_ms, self.options)


def simulate(config: PolicyConfig, router: Router, workload: Workload | Sequence[Arrival],
             fleet: Mapping[str, int], seed: int, duration: float, *,
             options: SimOptions = DEFAULT_OPTIONS) -> SimResult:
    """Run ``workload`` (generated with ``seed`` for ``duration`` s, or given) through ``router``.

    Every arrival gets exactly one record: ``ok``, ``rejected`` (shed by the router),
    ``failed`` (no pool serves it, or the pool chosen cannot run it) or ``unfinished``
    (queued on a pool with no live workers, lost with a dead worker and not reclaimed by the
    end, or cut off by ``options.drain_s``). A job run again after its worker died is one
    record with ``attempts`` > 1.
    """
    arrivals = generate(workload, seed, duration) if isinstance(workload, Workload) else list(workload)
    luck = SeededRandom(seed, stream=2) if any(t.random for t in options.truth.values()) else None
    run = _Run(config, router, fleet, options, SeededRandom(seed, stream=1), luck)
    end = run.run(arrivals, math.inf if options.drain_s is None else duration + options.drain_s)
    run.leftovers()
    usage = {name: PoolUsage(workers=len(p.workers), slots=p.slots, cost_per_hour=p.spec.cost_per_hour,
                             busy_s=sum(w.busy_s for w in p.workers), busy_cost=dict(p.busy_cost),
                             max_in_flight=max((w.max_in_flight for w in p.workers), default=0))
             for name, p in run.pools.items()}
    return SimResult(policy=router.name, workload=workload.name if isinstance(workload, Workload) else "custom",
                     seed=seed, duration=duration, end=end, fleet={n: len(p.workers) for n, p in run.pools.items()},
                     usage=usage, events=run.events, records=[run.records[k] for k in range(len(arrivals))])
