"""What a simulated run is told: where the simulated broker has choices, and how its devices
really behave against the profiles the router believes.

By default the devices follow the very profiles the routers plan with. ``SimOptions.truth``
makes a pool's devices differ (:class:`DeviceTruth`: slower or faster, per-job lognormal
noise, a heavy tail, slow nodes), multiplying each job's TTFT and inter-token times; the router
keeps believing the profile and must learn the difference from its observations
(:mod:`evaluation.scenarios` names the usual cases). ``SimOptions.failures`` kills workers
(:class:`Failure`) as the live stack loses them (see :mod:`evaluation.simulator`).
"""

from __future__ import annotations

import math

import msgspec

DECODE_CHUNK = 32
"""Tokens decoded between concurrency re-reads (``workers.simulated.DECODE_CHUNK``)."""


class DeviceTruth(msgspec.Struct, frozen=True, kw_only=True):
    """How one pool's devices really behave, against the profile the router believes.

    Every job's TTFT and time per output token are the profile's times this many times over:
    ``speed`` x (``slow_factor`` on the first ``slow_workers`` workers) x a lognormal noise of
    mean 1 and coefficient of variation ``noise_cv`` x (``tail_factor`` with probability
    ``heavy_tail``). The draws for a job are made when it arrives, from the run's own stream
    (``SeededRandom(seed, stream=2)``), so every router and every pool sees the same luck.
    The default is the profile exactly.
    """

    speed: float = 1.0
    """Multiplier on TTFT and ITL: 2.0 is twice as slow as the profile, 0.5 twice as fast."""
    noise_cv: float = 0.0
    """Coefficient of variation of a per-job lognormal multiplier of mean 1 (0: none)."""
    heavy_tail: float = 0.0
    """Probability that a job takes ``tail_factor`` times longer (a GC pause, a retried kernel)."""
    tail_factor: float = 10.0
    slow_workers: int = 0
    """Workers of the pool (the lowest indices) that run ``slow_factor`` times slower: slow nodes."""
    slow_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.speed <= 0 or self.tail_factor <= 0 or self.slow_factor <= 0:
            raise ValueError(f"speed, tail_factor and slow_factor must be > 0: {self}")
        if self.noise_cv < 0 or not 0 <= self.heavy_tail <= 1 or self.slow_workers < 0:
            raise ValueError(f"noise_cv and slow_workers must be >= 0, heavy_tail in [0, 1]: {self}")

    @property
    def random(self) -> bool:
        """Whether jobs draw per-job luck (noise or a heavy tail)."""
        return self.noise_cv > 0 or self.heavy_tail > 0

    def luck(self, z: float, u: float) -> float:
        """The per-job multiplier for a standard normal draw ``z`` and a uniform one ``u``."""
        m = 1.0
        if self.noise_cv > 0:
            sigma2 = math.log1p(self.noise_cv**2)
            m = math.exp(math.sqrt(sigma2) * z - sigma2 / 2)  # mean 1: the device's capacity holds
        if u < self.heavy_tail:
            m *= self.tail_factor
        return m

    def mean_factor(self, workers: int) -> float:
        """The slow-down a router that knew the truth would believe of a pool of ``workers``:
        ``speed`` times the mean of the per-job luck, times, for slow nodes, that of a uniform
        pool with the same capacity (``workers`` over the sum of the workers' speeds: the
        workers take jobs as slots free up, so a slow node also takes fewer of them)."""
        slow = min(self.slow_workers, workers)
        nodes = 1.0 if workers <= 0 else workers / (workers - slow + slow / self.slow_factor)
        return self.speed * nodes * (1 + self.heavy_tail * (self.tail_factor - 1))


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """Workers of one pool die at ``at_s`` and, with ``recover_at_s``, come back then.

    As live: the jobs they were running stay pending on the pool's stream until a live peer
    claims them ``SimOptions.reclaim_s`` later and runs them again from the start; their
    heartbeats stop, so the router's snapshot counts them ``SimOptions.heartbeat_lag_s``
    longer. Queued jobs wait for a live worker of the pool.
    """

    pool: str
    at_s: float
    workers: int | None = None
    """How many die (the highest-indexed live ones); None: all of them."""
    recover_at_s: float | None = None
    """When the same workers are back (a fresh worker beats at once); None: never."""

    def __post_init__(self) -> None:
        if self.at_s < 0 or (self.workers is not None and self.workers < 1):
            raise ValueError(f"a failure needs at_s >= 0 and workers >= 1 (or None for all): {self}")
        if self.recover_at_s is not None and self.recover_at_s <= self.at_s:
            raise ValueError(f"recover_at_s must be after at_s: {self}")


class SimOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How the simulated broker behaves where the live one has choices."""

    priority_queues: bool = True
    """One queue per priority lane, most urgent first, as the live workers' lanes
    (``PolicyConfig.lane``); False: one FIFO queue per pool, and snapshots without counts by lane."""
    snapshot_interval_s: float = 0.0
    """0: the router sees exact pool state; else a snapshot taken on a clock this often (live: 0.25)."""
    observation_interval_s: float = 0.0
    """0: the router observes each job as it finishes; else in batches that often, before a decision
    (live: worker heartbeats, every ``heartbeat_s`` = 1 s, read at the next snapshot refresh)."""
    decode_chunk: int = DECODE_CHUNK
    drain_s: float | None = None
    """Stop this long after the last arrival (jobs not done are ``unfinished``); None: run dry."""
    oracle_horizon: float = 2.0
    """The oracle's look-ahead waits for a job to start up to this many times its TTFT target."""
    oracle_decode_s: float = 1.0
    """... and follows its decoding this long, at least one chunk (or to its end), for time per token."""
    oracle_events: int = 5000
    """... and runs at most this many events per candidate pool (then what it saw is a lower bound)."""
    truth: dict[str, DeviceTruth] = {}
    """How each pool's devices really behave; a pool not named follows its profile exactly.
    The router still believes the profile (``PROFILES[spec.profile]``) and has to learn the rest."""
    failures: tuple[Failure, ...] = ()
    """Workers that die (and maybe come back) during the run."""
    reclaim_s: float = 30.0
    """How long a dead worker's jobs stay pending before a live peer takes them over (live:
    ``Settings.claim_idle_ms``, 30 s)."""
    heartbeat_lag_s: float = 5.0
    """How long a dead worker still counts in the snapshot (live: the policy ignores beats older
    than 5 x ``heartbeat_s`` = 5 s)."""


DEFAULT_OPTIONS = SimOptions()
