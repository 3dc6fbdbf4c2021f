"""The SLO-aware router: the cheapest pool predicted to meet the job's class target.

For a job of class ``C`` the router predicts, on every pool that serves the job's model and
kind (:class:`~policies.estimate.LatencyEstimator`): TTFT (queue wait plus prefill at the load
the job would join; the wait counts the running jobs and the queued jobs of ``C``'s own and
more urgent priority lanes, which are all a pool's workers run before it), time per output
token and end-to-end time (with ``max_tokens`` output, an upper bound). A pool *meets* ``C``
when every target ``C`` sets holds with the safety margin:
``prediction <= routing.safety_margin x target``. Pools that cannot take a job now are left
out first: no live worker (no recent heartbeat), or every worker's endpoints cooling down
after 429s; when that leaves nothing, the job waits on the default pool. Then:

1. **Cheapest meeting pool**, by :func:`~policies.estimate.job_cost` (the job's share of its
   worker's hourly cost for as long as it would run). Ties keep the configured order (default
   pool first).
2. **Spill-over.** A pool where the job would queue (the work ahead of it on its lane, as in
   the wait above, has reached the pool's capacity) is taken only when no pool where it
   starts at once meets the target: queue-wait predictions are the least certain part of
   the estimate, and a pool with a free slot for the job that meets the target is the safer bet.
3. **Priority: less urgent work fills idle capacity.** A pool with ``prefer_for`` classes is
   reserved for them: a class not listed there whose ``priority`` is numerically greater
   (less urgent) than every listed class may use the pool only while its whole backlog (every
   lane) is under ``IDLE_SHARE`` of its capacity, so the scarce accelerator always has free slots for the
   interactive work it is there for. If the job's model runs nowhere else, the reservation
   yields.
4. **Admission.** When no pool meets the target, the job goes best-effort to the pool with
   the lowest predicted TTFT, unless its class has ``on_unattainable = "shed"`` (the
   default) and even that pool misses the TTFT (or e2e) target by more than
   ``routing.shed_margin`` times it (:func:`unattainable`; 1.0 by default). It is then
   refused at once (``shed=True``, reason ``slo_unattainable: ...`` with the prediction) in
   three cases:

   - it would **queue on every pool** (the work ahead of it on its lane fills the pool's
     slots): it could only make the queues longer; :func:`retry_after_s` says when they are
     predicted to have drained enough;
   - it would miss **even on an idle pool** (no device meets the target): no retry hint, a
     retry would not help;
   - it could start at once somewhere, but misses by more than the shed margin on every pool
     **at the load it would join** (its prefill, and its e2e when the class sets one, slowed
     by the jobs running beside it): running it would slow those jobs too; the retry hint is
     the time for the load to fall by the excess (:func:`retry_after_s` again).

   Between the safety margin and the shed margin the estimate is too close to call, so the
   job runs. **Cold start:** a pool that has reported no finished job
   (:meth:`~policies.estimate.LatencyEstimator.observed`) is predicted from its device
   profile alone, which may be wrong about the hardware; so a job is never refused when its
   best pool, or any pool it would be predicted late on, has finished nothing yet: it runs
   best-effort, and the reason says why. In particular nothing is refused before some pool
   has reported a finished job, nor while no pool has a live worker (the predictions then
   say nothing).

A job whose model or kind no pool serves gets ``pool=None`` and a reason ``no pool serves ...``.
Every decision carries a short reason with the predicted numbers, and
``predicted_ttft_ms``/``predicted_e2e_ms``, so that a miss can be explained later.

Inside a pool, waiting jobs run by lane (``PolicyConfig.lane``): lower ``priority`` first
(interactive ahead of batch), first come first served within a priority, in the live workers'
priority lanes and the simulator's pool queues alike.
"""

from __future__ import annotations

import math

from policies.config import PolicyConfig, SLOClass
from policies.estimate import LatencyEstimator, Prediction
from policies.route import Decision, JobFeatures, PoolState, Snapshot
from policies.router import Observation, RandomSource

IDLE_SHARE = 0.5
"""Share of a reserved pool's capacity that less urgent classes may fill."""


def pool_capacity(config: PolicyConfig, pool: str, state: PoolState) -> int:
    """Jobs the pool runs at once: from heartbeats, else the configured concurrency of one worker each."""
    return max(1, state.capacity or config.pools[pool].concurrency * max(1, state.workers))


def reserved_against(config: PolicyConfig, pool: str, cls: SLOClass, slo: str) -> bool:
    """Whether ``pool`` is reserved for classes more urgent than ``cls`` (see the module docs)."""
    prefer = config.pools[pool].prefer_for
    if not prefer or slo in prefer:
        return False
    return cls.priority > min(config.classes[c].priority for c in prefer)


def misses(cls: SLOClass, pred: Prediction, margin: float) -> list[str]:
    """The targets of ``cls`` that ``pred`` misses with the margin, as short notes (empty: it meets)."""
    out: list[str] = []
    if pred.ttft_ms > margin * cls.ttft_ms:
        out.append(f"ttft {pred.ttft_ms:.0f}>{margin * cls.ttft_ms:.0f}ms")
    # One token (or an embedding) has no time per output token to miss.
    if cls.tpot_ms is not None and pred.output_tokens > 1 and pred.tpot_ms > margin * cls.tpot_ms:
        out.append(f"tpot {pred.tpot_ms:.1f}>{margin * cls.tpot_ms:.1f}ms")
    if cls.e2e_ms is not None and pred.e2e_ms > margin * cls.e2e_ms:
        out.append(f"e2e {pred.e2e_ms:.0f}>{margin * cls.e2e_ms:.0f}ms")
    return out


def unattainable(cls: SLOClass, pred: Prediction, shed_margin: float) -> list[str]:
    """The deadlines of ``cls`` (TTFT, e2e) that ``pred`` misses by more than ``shed_margin``
    times the target, as short notes (empty: admit). TPOT is left out: it does not grow with
    the queue, so refusing now would not help a later retry."""
    out: list[str] = []
    if pred.ttft_ms > shed_margin * cls.ttft_ms:
        out.append(f"ttft {pred.ttft_ms:.0f}>{shed_margin * cls.ttft_ms:.0f}ms")
    if cls.e2e_ms is not None and pred.e2e_ms > shed_margin * cls.e2e_ms:
        out.append(f"e2e {pred.e2e_ms:.0f}>{shed_margin * cls.e2e_ms:.0f}ms")
    return out


def retry_after_s(cls: SLOClass, pred: Prediction) -> float:
    """When a refused job is worth sending again, in whole seconds (at least 1): the time for
    the queue ahead of it to drain (or the load it would join to fall) by the excess of its
    predicted TTFT (or e2e) over the target."""
    excess_ms = max(pred.ttft_ms - cls.ttft_ms, (pred.e2e_ms - cls.e2e_ms) if cls.e2e_ms is not None else 0.0)
    return float(max(1, math.ceil(excess_ms / 1000)))


def describe(pred: Prediction) -> str:
    """The predicted numbers of one pool, short."""
    wait = f" (wait {pred.queue_wait_ms:.0f})" if pred.queue_wait_ms > 0 else ""
    return (f"{pred.pool} ttft {pred.ttft_ms:.0f}ms{wait} tpot {pred.tpot_ms:.1f}ms "
            f"e2e {pred.e2e_ms:.0f}ms ${pred.cost:.2e}")


class SloRouter:
    """The cheapest pool predicted to meet the job's SLO class, from learned estimates.

    Deterministic: it never draws from ``rng``. Feed it every finished job through
    :meth:`observe`; its estimates start from the pools' device profiles.
    """

    name = "slo"
    reusable = True

    def __init__(self, config: PolicyConfig, estimator: LatencyEstimator | None = None) -> None:
        self.config = config
        self.estimator = estimator or LatencyEstimator(config)

    def observe(self, obs: Observation) -> None:
        """Learn from a finished job."""
        self.estimator.observe(obs)

    def predict(self, job: JobFeatures, pool: str, snapshot: Snapshot, lane: int | None = None) -> Prediction | None:
        """What ``job`` of priority ``lane`` would see on ``pool`` now (``None``: the pool cannot
        run its model; ``lane=None``: it waits behind the whole backlog)."""
        return self.estimator.predict(job, pool, snapshot.pools.get(pool, PoolState()), snapshot.now, lane=lane)

    def decide(self, job: JobFeatures, slo: str, snapshot: Snapshot, rng: RandomSource) -> Decision:
        """Choose a pool for ``job`` of class ``slo`` (see the module docs for the rules)."""
        config = self.config
        note = ""
        if slo not in config.classes:  # classify() never does this; a stale caller might
            note = f"unknown class {slo!r}, using {config.default_class}; "
            slo = config.default_class
        cls, lane = config.classes[slo], config.lane(slo)
        preds = [p for n in config.serving(job.model, job.kind)
                 if (p := self.predict(job, n, snapshot, lane)) is not None]
        if not preds:
            return Decision(pool=None, reason=f"no pool serves {job.kind} on model {job.model!r}")

        def state(pool: str) -> PoolState:
            return snapshot.pools.get(pool, PoolState())

        notes: list[str] = []
        # A pool whose workers all stopped sending heartbeats would only queue the job; one
        # whose endpoints all refuse work (429s) would only burn its retries.
        staffed = [p for p in preds if state(p.pool).workers > 0 and not state(p.pool).cooling(snapshot.now)]
        if not staffed:
            # Nothing can take the job now (no worker has reported yet, or all are down):
            # the predictions say nothing, so it waits where a general-purpose worker will come.
            fallback = [p for p in preds if p.pool == config.default_pool]
            if fallback:
                preds = fallback
                notes.append("no pool has live workers: waiting on the default pool")
        elif len(staffed) < len(preds):
            for p in preds:
                if state(p.pool).workers == 0:
                    notes.append(f"{p.pool} has no live workers")
                elif state(p.pool).cooling(snapshot.now):
                    wait = (state(p.pool).cooling_until or 0) - snapshot.now
                    notes.append(f"{p.pool} cooling down for {wait:.1f} s")
            preds = staffed
        candidates: list[Prediction] = []
        for p in preds:
            cap = pool_capacity(config, p.pool, state(p.pool))
            # The whole backlog, not the job's lane: the rule keeps slots free for urgent work,
            # and queued work of any lane takes slots as they free up.
            if reserved_against(config, p.pool, cls, slo) and state(p.pool).backlog >= IDLE_SHARE * cap:
                notes.append(f"{p.pool} kept for more urgent classes (backlog {state(p.pool).backlog}/{cap})")
            else:
                candidates.append(p)
        if not candidates:  # the model runs only on reserved pools: serve it there anyway
            candidates = preds
            notes = [n for n in notes if "kept for" not in n]
        margin = config.routing.safety_margin
        missed = {p.pool: misses(cls, p, margin) for p in candidates}
        meeting = [p for p in candidates if not missed[p.pool]]
        notes += [f"{p.pool} misses {', '.join(missed[p.pool])}" for p in candidates if missed[p.pool]]

        if meeting:
            # Would the job queue? Only the work ahead of it on its lane says: queued work of
            # less urgent lanes waits for it, so a pool full of batch backlog still starts it
            # at the next free slot.
            free = [p for p in meeting if state(p.pool).ahead(lane) < pool_capacity(config, p.pool, state(p.pool))]
            best = min(free or meeting, key=lambda p: p.cost)
            if free and best.cost > min(p.cost for p in meeting):
                full = [p.pool for p in meeting if p not in free and p.cost < best.cost]
                notes.append(f"spill from saturated {', '.join(full)}")
            return self._decision(best, f"{note}{slo}: {describe(best)} meets, cheapest", notes)
        best = min(candidates, key=lambda p: p.ttft_ms)
        # With no live worker anywhere the predictions say nothing: never refuse on them.
        late = unattainable(cls, best, config.routing.shed_margin) if staffed and cls.on_unattainable == "shed" else []
        guessed = self._guessed(cls, best, candidates) if late else []
        if guessed:
            notes.append(f"not refused: {', '.join(guessed)} finished no job yet (profile guesses)")
        refusal = self._refusal(job, cls, lane, best, candidates, snapshot) if late and not guessed else None
        if refusal is not None:
            why, retry = refusal
            head = f"slo_unattainable: {note}no pool can serve {slo} in time: best {describe(best)}, {', '.join(late)}"
            return Decision(pool=None, reason="; ".join([f"{head}{why}", *notes]), shed=True,
                            predicted_ttft_ms=best.ttft_ms, predicted_e2e_ms=best.e2e_ms, retry_after_s=retry)
        return self._decision(best, f"{note}{slo}: best effort, {describe(best)} lowest ttft", notes)

    def _guessed(self, cls: SLOClass, best: Prediction, candidates: list[Prediction]) -> list[str]:
        """The pools a refusal of a job would rest on that have finished no job yet: its best
        pool and every pool it is predicted late on (see the module docs)."""
        margin = self.config.routing.shed_margin
        return [p.pool for p in candidates if (p is best or unattainable(cls, p, margin))
                and not self.estimator.observed(p.pool)]

    def _refusal(self, job: JobFeatures, cls: SLOClass, lane: int, best: Prediction, candidates: list[Prediction],
                 snapshot: Snapshot) -> tuple[str, float | None] | None:
        """Why ``job``, whose best pool misses by the shed margin, is refused, and the retry-after
        hint; ``None``: it runs best-effort (see the module docs, cases in that order)."""
        config = self.config

        def state(pool: str) -> PoolState:
            return snapshot.pools.get(pool, PoolState())

        # A job that would wait everywhere can only make the queues longer: refuse it, and say
        # when they are predicted to have drained enough.
        if all(state(p.pool).ahead(lane) >= pool_capacity(config, p.pool, state(p.pool)) for p in candidates):
            retry = retry_after_s(cls, best)
            return f"; retry after {retry:.0f} s", retry
        # One that starts at once somewhere adds no queue. If no idle pool could serve it in
        # time either, no device meets the target: refused, and a retry would not help.
        idle = [p for c in candidates
                if (p := self.estimator.predict(job, c.pool, PoolState(workers=1), snapshot.now, lane=lane))]
        if idle and all(unattainable(cls, p, config.routing.shed_margin) for p in idle):
            return " even on an idle pool", None
        # An idle pool would serve it in time, but every pool it could join now is too loaded:
        # running it anyway slows the jobs beside it for a miss. Come back when the load falls.
        if all(unattainable(cls, p, config.routing.shed_margin) for p in candidates):
            retry = retry_after_s(cls, best)
            return f" at the load it would join; retry after {retry:.0f} s", retry
        return None

    @staticmethod
    def _decision(pred: Prediction, head: str, notes: list[str]) -> Decision:
        reason = "; ".join([head, *notes])
        return Decision(pool=pred.pool, reason=reason, predicted_ttft_ms=pred.ttft_ms, predicted_e2e_ms=pred.e2e_ms)
