"""The usual routing policies, behind the same :class:`~policies.router.Router` Protocol, and a registry.

They exist to be beaten in the simulator by :class:`~policies.slo.SloRouter`, so each is the
plain, recognisable version of what deployments use. All of them route only to pools that
serve the job's model and kind (``pool=None``, ``no pool serves ...`` otherwise), never shed,
and attach the shared estimator's predicted TTFT/e2e so that their misses read like the SLO
router's. Ties go to the configured order (default pool first) unless a policy says it
draws from ``rng``.

*General-purpose* pools are those whose device has no hard concurrency cap (GPUs); *scarce*
pools have one (the accelerator, ``DeviceProfile.max_concurrency``).

:class:`OracleRouter` is the offline reference: the SLO router's rules, fed the truth about each
job instead of estimates. The simulator supplies it through ``truth`` (see there).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from policies.config import PolicyConfig
from policies.estimate import LatencyEstimator, Prediction, job_cost
from policies.profiles import PROFILES
from policies.route import Decision, JobFeatures, PoolState, Snapshot
from policies.router import Observation, RandomSource, Router, StaticRouter
from policies.slo import SloRouter, pool_capacity


class _Baseline:
    """Shared plumbing: serving pools, estimates for the record, the decision value."""

    name = "baseline"

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.estimator = LatencyEstimator(config)

    def observe(self, obs: Observation) -> None:
        """Learn from a finished job (only the attached predictions use it)."""
        self.estimator.observe(obs)

    def decide(self, job: JobFeatures, slo: str, snapshot: Snapshot, rng: RandomSource) -> Decision:
        """Choose among the pools that serve ``job``; none: ``pool=None``."""
        serving = self.config.serving(job.model, job.kind)
        if not serving:
            return Decision(pool=None, reason=f"no pool serves {job.kind} on model {job.model!r}")
        pool, why = self.choose(job, serving, snapshot, rng)
        pred = self.estimator.predict(job, pool, snapshot.pools.get(pool, PoolState()), snapshot.now,
                                      lane=self.config.lane(slo) if slo in self.config.classes else None)
        return Decision(pool=pool, reason=f"{self.name}: {why}",
                        predicted_ttft_ms=pred.ttft_ms if pred else None,
                        predicted_e2e_ms=pred.e2e_ms if pred else None)

    def choose(self, job: JobFeatures, serving: list[str], snapshot: Snapshot, rng: RandomSource) -> tuple[str, str]:
        """(pool, why) among ``serving`` (non-empty, default pool first)."""
        raise NotImplementedError

    def scarce(self, pool: str) -> bool:
        """Whether the pool's device has a hard concurrency cap (an accelerator)."""
        return PROFILES[self.config.pools[pool].profile].max_concurrency is not None

    def load(self, pool: str, snapshot: Snapshot) -> float:
        """Backlog per slot."""
        state = snapshot.pools.get(pool, PoolState())
        return state.backlog / pool_capacity(self.config, pool, state)


def _pick(ties: list[str], rng: RandomSource) -> str:
    # Draw only on a real tie, so that a policy with a clear winner consumes no randomness.
    return ties[0] if len(ties) == 1 else ties[min(len(ties) - 1, int(rng.random() * len(ties)))]


class GpuOnly(_Baseline):
    """Everything on the general-purpose pools: the default pool, else the least loaded GPU pool.

    A model only a scarce pool serves goes there anyway (said in the reason), so the baseline
    runs the same workload as every other policy.
    """

    name = "gpu_only"

    def choose(self, job: JobFeatures, serving: list[str], snapshot: Snapshot, rng: RandomSource) -> tuple[str, str]:
        general = [p for p in serving if not self.scarce(p)]
        if not general:
            return serving[0], f"no GPU pool serves {job.model!r}; fallback"
        if general[0] == self.config.default_pool:
            return general[0], "default pool"
        best = min(general, key=lambda p: self.load(p, snapshot))
        return best, "least loaded GPU pool"


class AccelOnly(_Baseline):
    """Everything on the scarce pools (least loaded first); a job they cannot serve goes to the default pool."""

    name = "accel_only"

    def choose(self, job: JobFeatures, serving: list[str], snapshot: Snapshot, rng: RandomSource) -> tuple[str, str]:
        scarce = [p for p in serving if self.scarce(p)]
        if not scarce:
            return serving[0], f"no accelerator serves {job.kind} on {job.model!r}; fallback"
        return min(scarce, key=lambda p: self.load(p, snapshot)), "least loaded accelerator"


class RoundRobin(_Baseline):
    """Each serving pool in turn (one rotation per set of serving pools)."""

    name = "round_robin"

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self._next: dict[tuple[str, ...], int] = {}

    def choose(self, job: JobFeatures, serving: list[str], snapshot: Snapshot, rng: RandomSource) -> tuple[str, str]:
        key = tuple(serving)
        i = self._next.get(key, 0)
        self._next[key] = (i + 1) % len(serving)
        return serving[i % len(serving)], f"turn {i % len(serving) + 1} of {len(serving)}"


class JoinShortestQueue(_Baseline):
    """The serving pool with the least backlog per slot; ties at random."""

    name = "jsq"

    def choose(self, job: JobFeatures, serving: list[str], snapshot: Snapshot, rng: RandomSource) -> tuple[str, str]:
        loads = {p: self.load(p, snapshot) for p in serving}
        low = min(loads.values())
        pool = _pick([p for p in serving if loads[p] == low], rng)
        return pool, f"backlog per slot {low:.2f}"


class LowestObservedLatency(_Baseline):
    """LiteLLM-style latency-based routing: the lowest EWMA of observed TTFT per pool.

    A black box: it sees only finished jobs' service-side TTFT (no queueing, no load, no
    model), which is what makes it herd onto whichever pool was fast a moment ago. Pools
    with no observation yet count as 0 ms, so each gets tried; ties at random.
    """

    name = "lowest_latency"
    alpha = 0.2

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self.latency: dict[str, float] = {}

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        old = self.latency.get(obs.pool)
        self.latency[obs.pool] = obs.ttft_ms if old is None else old + self.alpha * (obs.ttft_ms - old)

    def choose(self, job: JobFeatures, serving: list[str], snapshot: Snapshot, rng: RandomSource) -> tuple[str, str]:
        seen = {p: self.latency.get(p, 0.0) for p in serving}
        low = min(seen.values())
        pool = _pick([p for p in serving if seen[p] == low], rng)
        return pool, f"observed ttft {low:.0f}ms"


class CheapestFirst(_Baseline):
    """The serving pool with the lowest cost per slot (``cost_per_hour / concurrency``), whatever its load."""

    name = "cheapest_first"

    def choose(self, job: JobFeatures, serving: list[str], snapshot: Snapshot, rng: RandomSource) -> tuple[str, str]:
        pools = self.config.pools
        best = min(serving, key=lambda p: pools[p].cost_per_hour / pools[p].concurrency)
        return best, f"${pools[best].cost_per_hour / pools[best].concurrency:.3f} per slot-hour"


class OracleTruth(msgspec.Struct, frozen=True, kw_only=True):
    """What will really happen to one job on one pool; ``None`` fields fall back to the estimates."""

    output_tokens: int
    """Tokens the job will actually produce (the router otherwise assumes ``max_tokens``)."""
    ttft_ms: float | None = None
    """Service-side time to first token on that pool at the load it will run at (queueing excluded)."""
    tpot_ms: float | None = None
    queue_wait_ms: float | None = None


TruthFn = Callable[[JobFeatures, str, Snapshot], OracleTruth | None]
"""``truth(job, pool, snapshot)``: the truth about the job being decided, on one candidate pool."""


class OracleRouter(SloRouter):
    """The offline reference: the SLO router's rules with perfect knowledge of each job.

    The hook: the simulator sets ``truth`` (constructor argument or attribute) to a function
    called as ``truth(job, pool, snapshot)`` while :meth:`decide` runs, once per candidate
    pool. It knows which job is being decided (the simulator calls ``decide`` for one job at a
    time and can close over it, e.g. ``router.truth = lambda j, p, s: sim.truth_for(current, p)``)
    and returns an :class:`OracleTruth`: at least the job's real output length (drawn before
    routing), optionally the device's real TTFT/TPOT for it and its real queue wait. Without a
    ``truth`` (or when it returns ``None``) the oracle is the SLO router.
    """

    name = "oracle"
    reusable = False  # its truth is about the one job being decided

    def __init__(self, config: PolicyConfig, truth: TruthFn | None = None) -> None:
        super().__init__(config)
        self.truth = truth

    def predict(self, job: JobFeatures, pool: str, snapshot: Snapshot, lane: int | None = None) -> Prediction | None:
        """The SLO router's prediction with the truth substituted where the simulator supplies it."""
        known = self.truth(job, pool, snapshot) if self.truth is not None else None
        if known is None:
            return super().predict(job, pool, snapshot, lane)
        state = snapshot.pools.get(pool, PoolState())
        base = self.estimator.predict(job, pool, state, snapshot.now, output_tokens=known.output_tokens, lane=lane)
        if base is None:
            return None
        wait = base.queue_wait_ms if known.queue_wait_ms is None else known.queue_wait_ms
        prefill = base.ttft_ms - base.queue_wait_ms if known.ttft_ms is None else known.ttft_ms
        tpot = base.tpot_ms if known.tpot_ms is None else known.tpot_ms
        service = prefill + max(0, known.output_tokens - 1) * tpot
        return msgspec.structs.replace(
            base, queue_wait_ms=wait, ttft_ms=wait + prefill, tpot_ms=tpot, service_ms=service,
            e2e_ms=wait + service, cost=job_cost(self.config.pools[pool], service, base.concurrency))


ROUTERS: dict[str, Callable[[PolicyConfig], Router]] = {
    "slo": SloRouter,
    "oracle": OracleRouter,
    "gpu_only": GpuOnly,
    "accel_only": AccelOnly,
    "round_robin": RoundRobin,
    "jsq": JoinShortestQueue,
    "lowest_latency": LowestObservedLatency,
    "cheapest_first": CheapestFirst,
    "static": StaticRouter,
}
"""Every router the simulator can run, in report order (the SLO router, its lookahead reference, the
baselines, the static rule): ``ROUTERS[name](config)`` makes a fresh one. Only
``policies.config.LIVE_ROUTERS`` may run live."""
