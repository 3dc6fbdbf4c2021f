"""Misbelief scenarios: the simulated hardware differs from what the router believes.

A router plans with the pools' device profiles (``PROFILES[spec.profile]``) and corrects
them from what it observes (:class:`~policies.estimate.LatencyEstimator`). In a plain
simulation the devices follow those very profiles, so the correction is never exercised.
Each :class:`Scenario` here makes the truth differ (:class:`~evaluation.options.DeviceTruth`,
:class:`~evaluation.options.Failure`) for a run of a given length:

* ``accel-slow`` / ``gpu-slow``: the accelerator / GPU pools run 2x slower than their profile;
* ``noisy``: every job's device time is the profile's times a lognormal of mean 1, CV 0.5;
* ``heavy-tail``: 2% of jobs take 10x longer;
* ``slow-node``: one GPU worker runs 3x slower (a slow node);
* ``accel-down``: the accelerator pools' workers all die at 1/3 of the run and come back at 2/3;
* ``gpu-node-down``: one GPU worker dies at 1/3 and comes back at 2/3;
* ``heartbeat-lag``: ``accel-down`` with the policy noticing the death 15 s late instead of 5 s.

For comparison, :func:`believing` makes the SLO router with the truth as its belief (the
profiles scaled by each pool's expected slow-down), :class:`Watch` records what a router
learned and when, and :func:`routed_to_dead` counts jobs sent to a pool with no live worker
after the policy could have known.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Literal

import msgspec

from evaluation.metrics import accelerator_pools
from evaluation.options import DEFAULT_OPTIONS, DeviceTruth, Failure, SimOptions
from evaluation.records import SimResult
from policies.config import PolicyConfig
from policies.estimate import LatencyEstimator
from policies.profiles import ModelProfile
from policies.route import Decision, JobFeatures, Snapshot
from policies.router import Observation, RandomSource
from policies.slo import SloRouter

Pools = Literal["accel", "gpu", "all"]


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    """One way the truth differs from the belief, for a run of any length (see :meth:`options`)."""

    name: str
    description: str
    pools: Pools
    """Which pools it touches: the accelerators (a device with a hard concurrency cap), the
    general-purpose GPU pools, or all."""
    truth: DeviceTruth | None = None
    fail: bool = False
    """The pools' workers die at 1/3 of the run and come back at 2/3."""
    fail_workers: int | None = None
    """How many of each pool's workers die (None: all)."""
    heartbeat_lag_s: float | None = None
    """How long the policy still counts a dead worker (None: the live window, ``SimOptions``' default)."""

    def targets(self, config: PolicyConfig) -> list[str]:
        """The config's pools this scenario touches, in config order."""
        accel = accelerator_pools(config)
        return [p for p in config.pools
                if self.pools == "all" or (p in accel) == (self.pools == "accel")]

    def options(self, config: PolicyConfig, duration: float, base: SimOptions = DEFAULT_OPTIONS) -> SimOptions:
        """``base`` with this scenario's truth and failures for a run of ``duration`` s of arrivals."""
        pools = self.targets(config)
        truth = {**base.truth, **{p: self.truth for p in pools}} if self.truth is not None else base.truth
        failures = base.failures + tuple(
            Failure(pool=p, at_s=duration / 3, workers=self.fail_workers, recover_at_s=2 * duration / 3)
            for p in pools if self.fail)
        lag = base.heartbeat_lag_s if self.heartbeat_lag_s is None else self.heartbeat_lag_s
        return msgspec.structs.replace(base, truth=truth, failures=failures, heartbeat_lag_s=lag)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario(name="accel-slow", pools="accel", truth=DeviceTruth(speed=2.0),
             description="accelerator pools 2x slower than their profile"),
    Scenario(name="gpu-slow", pools="gpu", truth=DeviceTruth(speed=2.0),
             description="GPU pools 2x slower than their profile"),
    Scenario(name="noisy", pools="all", truth=DeviceTruth(noise_cv=0.5),
             description="every job's device time x a lognormal of mean 1, CV 0.5"),
    Scenario(name="heavy-tail", pools="all", truth=DeviceTruth(heavy_tail=0.02, tail_factor=10.0),
             description="2% of jobs take 10x longer"),
    Scenario(name="slow-node", pools="gpu", truth=DeviceTruth(slow_workers=1, slow_factor=3.0),
             description="one worker of each GPU pool 3x slower"),
    Scenario(name="accel-down", pools="accel", fail=True,
             description="accelerator pools down from 1/3 of the run to 2/3"),
    Scenario(name="gpu-node-down", pools="gpu", fail=True, fail_workers=1,
             description="one worker of each GPU pool down from 1/3 of the run to 2/3"),
    Scenario(name="heartbeat-lag", pools="accel", fail=True, heartbeat_lag_s=15.0,
             description="accel-down, noticed after 15 s instead of 5 s"),
)}
"""Every named scenario (``inference-broker simulate --scenario NAME``)."""


# --------------------------------------------------------------------------- a router told the truth


def scaled(profile: ModelProfile, factor: float) -> ModelProfile:
    """``profile`` with every TTFT and inter-token latency ``factor`` times longer."""
    return msgspec.structs.replace(profile, ttft_ms=tuple((c, v * factor) for c, v in profile.ttft_ms),
                                   itl_ms=tuple((c, v * factor) for c, v in profile.itl_ms))


class BelievingEstimator(LatencyEstimator):
    """A :class:`LatencyEstimator` whose cold-start belief is each pool's profile times ``factors[pool]``."""

    def __init__(self, config: PolicyConfig, factors: Mapping[str, float]) -> None:
        super().__init__(config)
        self.scale = dict(factors)
        self._scaled: dict[tuple[str, str], ModelProfile | None] = {}

    def profile(self, pool: str, model: str) -> ModelProfile | None:
        key = (pool, model)
        if key not in self._scaled:
            base = super().profile(pool, model)
            factor = self.scale.get(pool, 1.0)
            self._scaled[key] = base if base is None or factor == 1.0 else scaled(base, factor)
        return self._scaled[key]


def believing(config: PolicyConfig, options: SimOptions, fleet: Mapping[str, int]) -> SloRouter:
    """The SLO router believing the truth of ``options`` about each pool of ``fleet``: its
    profile scaled by the expected slow-down of a job there (:meth:`DeviceTruth.mean_factor`).
    It still learns from observations (and has little to correct)."""
    factors = {p: t.mean_factor(fleet.get(p, 0)) for p, t in options.truth.items()}
    router = SloRouter(config, BelievingEstimator(config, factors))
    router.name = "true_profile"
    return router


# --------------------------------------------------------------------------- what a router learned


class Watch:
    """Wraps the SLO router and records, after each observation of ``pool``, its learned
    (TTFT, TPOT) correction factors for the job's model at the job's concurrency."""

    def __init__(self, router: SloRouter, pool: str) -> None:
        self.router, self.pool, self.name = router, pool, router.name
        self.factors: list[tuple[float, str, float, float]] = []
        """(observed at, model, TTFT factor, TPOT factor), in observation order."""

    def decide(self, job: JobFeatures, slo: str, snapshot: Snapshot, rng: RandomSource) -> Decision:
        return self.router.decide(job, slo, snapshot, rng)

    def observe(self, obs: Observation) -> None:
        self.router.observe(obs)
        if obs.pool == self.pool:
            ttft, tpot = self.router.estimator.factors(self.pool, obs.model, obs.concurrency)
            self.factors.append((obs.at, obs.model, ttft, tpot))

    def model(self) -> str | None:
        """The model observed most often on the pool (its factors are the ones worth reading)."""
        counts = Counter(model for _, model, _, _ in self.factors).most_common(1)
        return counts[0][0] if counts else None

    def series(self, model: str | None = None) -> list[tuple[float, float, float]]:
        """(at, TTFT factor, TPOT factor) for ``model`` (default: :meth:`model`)."""
        model = model or self.model()
        return [(at, ttft, tpot) for at, m, ttft, tpot in self.factors if m == model]

    def learned_at(self, target: float, tolerance: float = 0.25, model: str | None = None) -> float | None:
        """The first time both factors of ``model`` were within ``tolerance`` (relative) of
        ``target``; None: never."""
        return next((at for at, ttft, tpot in self.series(model)
                     if abs(ttft / target - 1) <= tolerance and abs(tpot / target - 1) <= tolerance), None)

    def at(self, t: float, model: str | None = None) -> tuple[float, float]:
        """The (TTFT, TPOT) factors of ``model`` after its last observation by ``t`` (1.0 before any).

        Read them at the end of the arrivals rather than of the run: the last jobs to finish
        are the slowest (heavy tails, slow nodes), and learning from them alone says nothing."""
        seen = [(ttft, tpot) for at, ttft, tpot in self.series(model) if at <= t]
        return seen[-1] if seen else (1.0, 1.0)


# --------------------------------------------------------------------------- dead pools


def dead_spans(options: SimOptions, fleet: Mapping[str, int]) -> dict[str, list[tuple[float, float]]]:
    """When each pool had no live worker, from ``options.failures`` (end ``inf``: never back)."""
    events: list[tuple[float, int, Failure]] = sorted(
        [(f.at_s, 1, f) for f in options.failures]
        + [(f.recover_at_s, 0, f) for f in options.failures if f.recover_at_s is not None])
    live = dict(fleet)
    died: dict[int, int] = {}
    since: dict[str, float] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for at, kill, f in events:  # at one instant, recoveries first (0 before 1)
        n = live.get(f.pool, 0)
        if kill:
            died[id(f)] = n if f.workers is None else min(f.workers, n)
            live[f.pool] = n - died[id(f)]
            if n > 0 and live[f.pool] == 0:
                since[f.pool] = at
        else:
            live[f.pool] = n + died.pop(id(f), 0)
            if n == 0 and live[f.pool] > 0 and f.pool in since:
                spans.setdefault(f.pool, []).append((since.pop(f.pool), at))
    for pool, start in since.items():
        spans.setdefault(pool, []).append((start, math.inf))
    return spans


def routed_to_dead(result: SimResult, options: SimOptions, grace_s: float | None = None) -> int:
    """Jobs routed to a pool with no live worker more than ``grace_s`` after it died (default
    ``options.heartbeat_lag_s``: once its heartbeats had run out, which a router that reads
    heartbeats must never do; 0: every job sent to a dead pool)."""
    grace = options.heartbeat_lag_s if grace_s is None else grace_s
    spans = dead_spans(options, result.fleet)
    return sum(1 for r in result.records if r.pool is not None and r.status != "rejected"
               and any(start + grace <= r.arrival < end for start, end in spans.get(r.pool, ())))
