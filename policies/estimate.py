"""Online latency estimates per (pool, model), learned from finished jobs.

Cold start is the pool's device profile (``PROFILES[spec.profile].model(model)``). Each
:class:`~policies.router.Observation` then updates a *correction factor*: the ratio of what
was observed to what the profile predicted at the concurrency the job ran at, kept
separately for TTFT (prefill) and for time per output token, per concurrency bucket
(powers of two: 1, 2-3, 4-7, ...). Ratios, not absolute times, so that one job's prompt
length or load does not pollute the estimate for another.

Each factor is a *clipped EWMA in log space*: one observation moves the log-ratio by at most
``alpha x ln 2``, so a single 100x outlier (a GC pause, a retried request) shifts predictions
by a few percent, while a sustained change (a slower device, a driver regression) is still
learned fully, since repeated steps converge on the new ratio. The first few observations
weigh more (the profile counts as one prior observation) so a freshly started pool learns
quickly. A bucket with few observations borrows from the whole model's factor.

Queue wait: jobs beyond the pool's capacity wait for slots. Ahead of a job are the pool's
running jobs and the queued jobs of its own and more urgent priority lanes
(:meth:`~policies.route.PoolState.ahead`): workers fill free slots from the most urgent lane
first, so queued work of less urgent lanes never delays it. Charging an interactive job for
queued batch work made every saturated pool look like a miss under overload. With ``excess``
jobs ahead of this one beyond capacity, the wait is ``excess x S / capacity`` where ``S`` is the pool's mean
observed service time (start to last token; the profile's prediction for this job at full
load until something has been observed). When recent observations show the pool running at
full concurrency, its observed drain rate (completions per second over the last
``DRAIN_WINDOW`` jobs, from ``Observation.at`` up to ``Snapshot.now``) replaces the model;
it is not trusted otherwise, because a lightly loaded pool drains only as fast as work
arrives, which says nothing about its capacity.

Cold start also bounds what the predictions may be used for. A pool that has reported no
finished job (:meth:`LatencyEstimator.observed`) is predicted from its profile alone, which
may be wrong about the hardware by any factor; the SLO router therefore refuses no job on
such a prediction (``policies.slo``), and while no pool has reported one it refuses nothing.

Everything here is deterministic: time comes from ``Observation.at`` and the ``now`` passed in.
"""

from __future__ import annotations

import bisect
import math

import msgspec

from policies.config import PolicyConfig, PoolSpec
from policies.profiles import PROFILES, ModelProfile
from policies.route import JobFeatures, PoolState
from policies.router import Observation

ALPHA = 0.1
"""Steady-state EWMA weight of one observation (half-life about 7 observations)."""
CLIP = math.log(2.0)
"""Largest log-ratio step one observation can contribute (before ``ALPHA``)."""
BUCKET_PRIOR = 3.0
"""Observations a concurrency bucket needs to weigh as much as the whole model's factor."""
SERVICE_ALPHA = 0.05
"""EWMA weight for the pool's mean service time (service times are heavy-tailed)."""
DRAIN_WINDOW = 32
"""Completions kept per pool for the drain rate."""
MIN_DRAIN = 8
"""Completions needed before the drain rate is used."""
FULL_SHARE = 0.75
"""Share of the window that must have run at full concurrency for the drain rate to count."""
_FLOOR_MS = 1e-3
"""Times are floored here before taking logs (an instant device reports 0 ms)."""


def job_cost(spec: PoolSpec, service_ms: float, concurrency: int) -> float:
    """Dollars one job costs on ``spec``: its share of the worker for as long as it runs.

    A worker costs ``cost_per_hour`` whether it runs one job or many; the jobs running
    together split it. So a job that holds one of ``concurrency`` busy slots for
    ``service_ms`` costs ``cost_per_hour x service_ms / 3.6e6 / concurrency``. Per output token
    this falls as load rises (time per token grows more slowly than concurrency), which is the
    design's point: a saturated GPU is the cheapest per token, an idle one is expensive, and the
    accelerator is fast but dear per slot. The simulator should account cost the same way.
    """
    return spec.cost_per_hour * service_ms / 3_600_000.0 / max(1, concurrency)


class Prediction(msgspec.Struct, frozen=True, kw_only=True):
    """What a job would see on one pool if routed there now."""

    pool: str
    concurrency: int
    """Jobs in flight on its worker while it runs (itself included)."""
    queue_wait_ms: float
    ttft_ms: float
    """Queue wait plus prefill: the TTFT the job's class target is about."""
    tpot_ms: float
    output_tokens: int
    """Tokens assumed for e2e and cost: ``max_tokens`` (an upper bound) unless an oracle knows."""
    service_ms: float
    """Start of inference to last token."""
    e2e_ms: float
    cost: float
    """Dollars, see :func:`job_cost`."""


class _LogRatio:
    """Clipped EWMA of log(observed / predicted)."""

    __slots__ = ("count", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.count = 0

    def update(self, observed: float, predicted: float) -> None:
        x = math.log(max(observed, _FLOOR_MS) / predicted)
        # The profile counts as one prior observation, so early samples weigh more.
        alpha = max(ALPHA, 1.0 / (self.count + 2))
        self.value += alpha * min(CLIP, max(-CLIP, x - self.value))
        self.count += 1


def bucket(concurrency: int) -> int:
    """Concurrency bucket: 0 for 1, 1 for 2-3, 2 for 4-7, ..."""
    return max(1, concurrency).bit_length() - 1


class _ModelState:
    __slots__ = ("buckets", "itl", "ttft")

    def __init__(self) -> None:
        self.ttft = _LogRatio()
        self.itl = _LogRatio()
        self.buckets: dict[int, tuple[_LogRatio, _LogRatio]] = {}

    def factor(self, which: int, concurrency: int) -> float:
        overall = (self.ttft, self.itl)[which]
        local = self.buckets.get(bucket(concurrency))
        if local is None:
            return math.exp(overall.value)
        b = local[which]
        w = b.count / (b.count + BUCKET_PRIOR)
        return math.exp(w * b.value + (1 - w) * overall.value)


class _PoolState:
    __slots__ = ("done", "service_count", "service_ms")

    def __init__(self) -> None:
        self.service_ms = 0.0
        self.service_count = 0
        self.done: list[tuple[float, bool]] = []
        """(finished at, ran at full concurrency), sorted by time; observations may arrive out of order."""


class LatencyEstimator:
    """Learned TTFT/TPOT per (pool, model) and queue wait per pool. Feed it observations."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._models: dict[tuple[str, str], _ModelState] = {}
        self._pools: dict[str, _PoolState] = {name: _PoolState() for name in config.pools}

    def profile(self, pool: str, model: str) -> ModelProfile | None:
        """The pool's configured device profile for ``model`` (``None``: not served there)."""
        spec = self.config.pools.get(pool)
        return None if spec is None else PROFILES[spec.profile].model(model)

    def observe(self, obs: Observation) -> None:
        """Learn from one finished job. Observations of unknown pools or models are ignored."""
        profile = self.profile(obs.pool, obs.model)
        if profile is None:
            return
        spec = self.config.pools[obs.pool]
        state = self._models.setdefault((obs.pool, obs.model), _ModelState())
        local = state.buckets.setdefault(bucket(obs.concurrency), (_LogRatio(), _LogRatio()))
        # A profile predicting ~0 ms (instant device, embeddings' decode) has nothing to scale.
        predicted_ttft = profile.ttft(obs.prompt_tokens, obs.concurrency)
        if predicted_ttft > _FLOOR_MS:
            state.ttft.update(obs.ttft_ms, predicted_ttft)
            local[0].update(obs.ttft_ms, predicted_ttft)
        predicted_itl = profile.itl(obs.concurrency)
        if obs.tpot_ms is not None and predicted_itl > _FLOOR_MS:
            state.itl.update(obs.tpot_ms, predicted_itl)
            local[1].update(obs.tpot_ms, predicted_itl)

        pool = self._pools[obs.pool]
        service = obs.ttft_ms + max(0, obs.output_tokens - 1) * (obs.tpot_ms or 0.0)
        alpha = max(SERVICE_ALPHA, 1.0 / (pool.service_count + 1))
        pool.service_ms += alpha * (service - pool.service_ms)
        pool.service_count += 1
        bisect.insort(pool.done, (obs.at, obs.concurrency >= spec.concurrency))
        if len(pool.done) > DRAIN_WINDOW:
            del pool.done[0]

    def factors(self, pool: str, model: str, concurrency: int) -> tuple[float, float]:
        """(TTFT, TPOT) correction factors learned so far: observed / profile, 1.0 when nothing is known."""
        state = self._models.get((pool, model))
        if state is None:
            return 1.0, 1.0
        return state.factor(0, concurrency), state.factor(1, concurrency)

    def drain_rate(self, pool: str, now: float) -> float | None:
        """Completions per second over the recent window, if the pool was running full; else ``None``."""
        done = self._pools[pool].done
        if len(done) < MIN_DRAIN or sum(full for _, full in done) < FULL_SHARE * len(done):
            return None
        # Up to ``now``, not the last completion: a pool that stopped finishing work drains slower.
        span = max(now, done[-1][0]) - done[0][0]
        return (len(done) - 1) / span if span > 0 else None

    def observed(self, pool: str) -> bool:
        """Whether ``pool`` has reported a finished job (of a model its profile knows): before
        that, its predictions are the profile's guesses."""
        state = self._pools.get(pool)
        return state is not None and state.service_count > 0

    def mean_service_ms(self, pool: str) -> float | None:
        """The pool's mean observed service time (start to last token), or ``None`` before any."""
        state = self._pools[pool]
        return state.service_ms if state.service_count else None

    def predict(self, job: JobFeatures, pool: str, state: PoolState, now: float,
                output_tokens: int | None = None, *, lane: int | None = None) -> Prediction | None:
        """What ``job`` would see on ``pool`` given its live ``state``; ``None`` if it cannot run there.

        ``output_tokens`` defaults to ``job.max_tokens``: the router cannot know how many
        tokens a job will produce, and the upper bound keeps e2e and cost conservative.
        ``lane`` is the job's priority lane (``PolicyConfig.lane``); ``None``: it waits behind
        the whole backlog.
        """
        profile = self.profile(pool, job.model)
        if profile is None:
            return None
        spec = self.config.pools[pool]
        workers = max(1, state.workers)  # no heartbeat yet: assume the pool is starting one worker
        capacity = max(1, state.capacity or spec.concurrency * workers)
        # This job joins ``backlog`` others (queued or running), spread over the workers: the
        # whole backlog, less urgent lanes included, since their jobs take every slot it leaves.
        concurrency = max(1, min(spec.concurrency, -(-(state.backlog + 1) // workers)))
        ttft_factor, itl_factor = self.factors(pool, job.model, concurrency)
        prefill = profile.ttft(job.prompt_tokens, concurrency) * ttft_factor
        tpot = profile.itl(concurrency) * itl_factor
        tokens = job.max_tokens if output_tokens is None else output_tokens
        service = prefill + max(0, tokens - 1) * tpot

        wait = 0.0
        excess = state.ahead(lane) + 1 - capacity
        if excess > 0:
            rate = self.drain_rate(pool, now)
            if rate is not None:
                wait = excess / rate * 1000.0
            else:
                mean = self.mean_service_ms(pool)
                if mean is None:  # cold start: assume the jobs ahead look like this one at full load
                    f_ttft, f_itl = self.factors(pool, job.model, spec.concurrency)
                    mean = (profile.ttft(job.prompt_tokens, spec.concurrency) * f_ttft
                            + max(0, tokens - 1) * profile.itl(spec.concurrency) * f_itl)
                wait = excess * mean / capacity
        return Prediction(
            pool=pool, concurrency=concurrency, queue_wait_ms=wait, ttft_ms=wait + prefill, tpot_ms=tpot,
            output_tokens=tokens, service_ms=service, e2e_ms=wait + service,
            cost=job_cost(spec, service, concurrency),
        )
