"""A discrete-event simulator of the broker on a virtual clock: same routers, simulated pools.

Each job arrives, is classified (:func:`policies.classify.classify`) and routed by the
:class:`~policies.router.Router` under test from a :class:`Snapshot` of the pools, then
waits in its pool's queue until a worker has a free slot. A pool has ``fleet[pool]``
workers, each a continuous-batching device running up to ``min(concurrency, device cap)``
jobs at once; a queued job goes to the worker with the most free slots. The device model
mirrors ``workers.simulated.SimulatedBackend`` step for step, so that live and simulated
runs agree:

* TTFT is ``profile.ttft(prompt, in_flight)`` read once when the job starts (its own slot
  counted);
* decoding advances in chunks of :data:`DECODE_CHUNK` tokens, each taking
  ``chunk * profile.itl(in_flight)`` with the worker's in-flight count re-read at the start
  of every chunk: jobs slow down as others join and speed up as they leave;
* a job produces ``max(1, max_tokens)`` tokens; an embedding none, finishing at its first token.

Each pool has one FIFO queue per priority lane (``PolicyConfig.lane``: one per distinct class
priority), and a free slot takes, as the live workers read: the head of a lane below the first
that runs fewer jobs on that worker than its reserved slots (``policies.config.reserved_slots``
of its classes' ``min_share``), else the head of the most urgent non-empty lane.

The snapshot mirrors the policy worker's: ``backlog`` is queued plus running (the pool
streams' lag plus pending), ``queued`` the waiting jobs by lane (each lane stream's lag),
``capacity`` is workers times slots. It is exact at every
decision by default; with ``snapshot_interval_s`` it is refreshed on a clock that often and,
between refreshes, counts the simulator's own routing into the backlog, as the live worker does.
The router learns from an :class:`Observation` the moment a job finishes, or, with
``observation_interval_s``, in batches that often (live: with each worker heartbeat).

**Truth and belief.** By default the devices follow the very profiles the routers plan with.
``SimOptions.truth`` makes a pool's devices differ (:class:`DeviceTruth`: slower or faster,
per-job lognormal noise, a heavy tail, slow nodes), multiplying each job's TTFT and inter-token
times; the router keeps believing the profile and must learn the difference from its
observations (:mod:`evaluation.scenarios` names the usual cases). ``SimOptions.failures`` kills
workers (:class:`Failure`) as the live stack loses them: their running jobs stay pending and are
run again from the start by a live peer of the pool ``reclaim_s`` later (the live claim timeout),
the snapshot keeps counting the dead workers for ``heartbeat_lag_s`` (until their heartbeats are
too old), queued jobs wait for a live worker, and a recovery brings the same workers back empty.

The offline reference (:class:`~evaluation.baselines.OracleRouter`) gets the truth through its
``truth`` hook: for the job being decided and a candidate pool, the simulator copies that
pool (workers, running jobs, queue), adds the job and runs the copy forward with no further
arrivals: the job's real queue wait, TTFT and time per output token on that pool (its true
devices, without failures to come), as far as they do not depend on jobs not yet arrived.

Events live in one heap per pool keyed by (time, sequence), so a minute of thousands of
jobs takes a fraction of a second per policy. Randomness: the workload draws from
``SeededRandom(seed)``, the router from ``SeededRandom(seed, stream=1)``, so every router sees
the same jobs; the devices' per-job luck (``DeviceTruth``) comes from ``stream=2``, drawn at
arrival, so every router and pool sees the same luck for the same job.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import msgspec

from evaluation.baselines import OracleRouter, OracleTruth
from evaluation.workloads import Arrival, SeededRandom, Workload, generate
from policies.classify import classify
from policies.config import PolicyConfig, PoolSpec, SLOClass, reserved_slots
from policies.profiles import PROFILES, ModelProfile
from policies.route import JobFeatures, PoolState, Snapshot
from policies.router import Observation, Router

DECODE_CHUNK = 32
"""Tokens decoded between concurrency re-reads (``workers.simulated.DECODE_CHUNK``)."""

Status = Literal["ok", "rejected", "failed", "unfinished"]
_FIRST, _CHUNK = 0, 1


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
    """One queue per priority lane, most urgent first, as the live workers' lanes (the order of
    ``policies.slo.queue_key``); False: one FIFO queue per pool, and snapshots without counts by lane."""
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


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What happened to one job. Times are seconds on the virtual clock (0 = start of the run)."""

    id: int
    cls: str
    tenant: str
    model: str
    kind: str
    prompt_tokens: int
    max_tokens: int
    arrival: float
    status: Status
    reason: str
    pool: str | None = None
    worker: int | None = None
    start: float | None = None
    first_token: float | None = None
    finish: float | None = None
    output_tokens: int = 0
    concurrency: int = 0
    """Jobs in flight on the worker when this one started, itself included."""
    cost_usd: float = 0.0
    """Its share of its worker while it ran: the worker's cost split evenly over the jobs in
    flight at each instant (``policies.estimate.job_cost``, integrated exactly)."""
    predicted_ttft_ms: float | None = None
    slo_met: bool = False
    attempts: int = 1
    """Runs started: more than one when a worker died under it and a peer ran it again."""

    @property
    def rejected(self) -> bool:
        return self.status == "rejected"

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.arrival) * 1000

    @property
    def e2e_ms(self) -> float | None:
        return None if self.finish is None else (self.finish - self.arrival) * 1000

    @property
    def tpot_ms(self) -> float | None:
        if self.finish is None or self.first_token is None or self.output_tokens < 2:
            return None
        return (self.finish - self.first_token) * 1000 / (self.output_tokens - 1)


def meets(slo: SLOClass, rec: JobRecord) -> bool:
    """Every target that is set holds (as ``workers.worker.slo_met``); only served jobs can."""
    ttft, e2e, tpot = rec.ttft_ms, rec.e2e_ms, rec.tpot_ms
    if rec.status != "ok" or ttft is None or e2e is None or ttft > slo.ttft_ms:
        return False
    if slo.tpot_ms is not None and tpot is not None and tpot > slo.tpot_ms:
        return False
    return slo.e2e_ms is None or e2e <= slo.e2e_ms


class PoolUsage(msgspec.Struct, frozen=True, kw_only=True):
    """One pool over a run: what was provisioned and how much of it was used."""

    workers: int
    slots: int
    """Jobs one worker runs at once: the pool's concurrency, capped by the device."""
    cost_per_hour: float
    """Per worker."""
    busy_s: float
    """Worker-seconds with at least one job in flight."""
    busy_cost: dict[str, float]
    """Dollars of busy worker-time by SLO class (the sum of its jobs' ``cost_usd``)."""
    max_in_flight: int
    """Most jobs any one worker ran at once."""


class SimResult(msgspec.Struct, frozen=True, kw_only=True):
    """Records of every job of one run, in arrival order, and the pools' usage."""

    policy: str
    workload: str
    seed: int
    duration: float
    """Arrivals fall in ``[0, duration)``."""
    end: float
    """When the last job finished (or the run was stopped)."""
    fleet: dict[str, int]
    usage: dict[str, PoolUsage]
    events: int
    """Device events processed (first tokens and decode chunks): the run's work, for sanity bounds."""
    records: list[JobRecord]


# --------------------------------------------------------------------------- the devices


class _Worker:
    __slots__ = ("acc", "busy_s", "busy_since", "by_lane", "died", "factor", "in_flight", "index", "last",
                 "max_in_flight", "rate", "slots")

    def __init__(self, index: int, slots: int, cost_per_hour: float, lanes: int, factor: float = 1.0) -> None:
        self.index, self.slots, self.rate, self.factor = index, slots, cost_per_hour / 3600, factor
        """``factor``: how much slower than its pool's truth this worker runs (a slow node)."""
        self.in_flight = self.max_in_flight = 0
        self.by_lane = [0] * lanes
        """Jobs in flight by priority lane (what a lane's reserved slots are counted against)."""
        self.busy_since = self.busy_s = self.last = self.acc = 0.0
        self.died: float | None = None
        """When it died (None: alive): its last heartbeat still counts for a while after."""

    def clone(self) -> _Worker:
        w = _Worker(self.index, self.slots, 0.0, 0, self.factor)
        w.rate, w.in_flight, w.max_in_flight, w.by_lane = self.rate, self.in_flight, self.max_in_flight, [*self.by_lane]
        w.busy_since, w.busy_s, w.last, w.acc, w.died = self.busy_since, self.busy_s, self.last, self.acc, self.died
        return w

    def _accrue(self, now: float) -> None:
        # ``acc``: dollars per job-share so far; a job's cost is its difference over its life.
        if self.in_flight:
            self.acc += self.rate * (now - self.last) / self.in_flight
        self.last = now

    def join(self, now: float, lane: int) -> None:
        self._accrue(now)
        if self.in_flight == 0:
            self.busy_since = now
        self.in_flight += 1
        self.by_lane[lane] += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, now: float, lane: int) -> None:
        self._accrue(now)
        self.in_flight -= 1
        self.by_lane[lane] -= 1
        if self.in_flight == 0:
            self.busy_s += now - self.busy_since


class _Job:
    __slots__ = ("acc0", "arrival", "attempts", "chunk", "cls", "concurrency", "cost", "first", "first_due", "i",
                 "job", "lane", "last", "luck", "model", "own", "predicted", "remaining", "slow", "start", "worker")

    def __init__(self, i: int, arrival: float, job: JobFeatures, cls: str, lane: int,
                 luck: tuple[float, float] = (0.0, 1.0)) -> None:
        self.i, self.arrival, self.job, self.cls, self.lane, self.luck = i, arrival, job, cls, lane, luck
        """``luck``: the job's (normal, uniform) draws for its device's noise and tail (``DeviceTruth.luck``)."""
        self.worker: _Worker | None = None
        self.model: ModelProfile | None = None
        self.start = self.first_due = self.last = self.acc0 = self.cost = 0.0
        self.slow = 1.0
        """The truth's multiplier on this run's profile times (set when it starts)."""
        self.first: float | None = None
        self.remaining = self.chunk = self.concurrency = 0
        self.attempts = 0
        self.predicted: float | None = None
        self.own = False
        """Made for a look-ahead copy (the job being decided): the copy may start it in place."""

    def clone(self, workers: Mapping[int, _Worker]) -> _Job:
        j = _Job(self.i, self.arrival, self.job, self.cls, self.lane, self.luck)
        j.worker = None if self.worker is None else workers[self.worker.index]
        j.model, j.start, j.first_due, j.last, j.acc0 = self.model, self.start, self.first_due, self.last, self.acc0
        j.first, j.remaining, j.chunk, j.concurrency = self.first, self.remaining, self.chunk, self.concurrency
        j.slow, j.attempts, j.cost = self.slow, self.attempts, self.cost
        return j


Finished = Callable[[_Job, float, int], None]


class _Pool:
    """One pool's workers, queue and events: the device model in one place (runs and look-aheads)."""

    def __init__(self, name: str, spec: PoolSpec, workers: int, shares: Sequence[float], priority: bool,
                 chunk: int, truth: DeviceTruth | None = None, heartbeat_lag_s: float = 0.0) -> None:
        self.name, self.spec, self.profile = name, spec, PROFILES[spec.profile]
        cap = self.profile.max_concurrency
        self.slots = spec.concurrency if cap is None else min(spec.concurrency, cap)
        lanes = len(shares) if priority else 1
        self.truth = truth or DeviceTruth()
        slow = self.truth.slow_workers
        self.workers = [_Worker(i, self.slots, spec.cost_per_hour, lanes, self.truth.slow_factor if i < slow else 1.0)
                        for i in range(workers)]
        self.live = list(self.workers)
        """The workers running now, by index (all of them unless ``SimOptions.failures``)."""
        self.lag = heartbeat_lag_s
        self.lost: list[_Job] = []
        """Jobs of dead workers, pending on the stream until a peer reclaims them."""
        self.priority, self.chunk = priority, chunk
        self.lanes: list[deque[_Job]] = [deque() for _ in range(lanes)]
        """Waiting jobs by priority lane, most urgent first (one FIFO without ``priority``)."""
        self.reserved = reserved_slots(shares, self.slots) if priority else (0,)
        """Slots of each worker that each lane keeps for its own work, as the live workers'."""
        self.queued = self.in_flight = self.seq = 0
        self.events: list[tuple[float, int, int, _Job]] = []
        self.busy_cost: dict[str, float] = {}
        self.on_finish: Finished = lambda job, now, tokens: None
        self.itl_ms: dict[tuple[int, int], float] = {}
        """ITL by (id of the model profile, jobs in flight): memoised, the hot path of every chunk."""
        self.borrowed: dict[int, _Worker] | None = None
        """In a copy: its workers by index. The queue still holds the original's jobs, copied as they start."""

    def clone(self) -> _Pool:
        """A copy to run forward without touching this one."""
        p = _Pool.__new__(_Pool)
        p.name, p.spec, p.profile, p.slots, p.priority, p.chunk, p.itl_ms, p.reserved = (
            self.name, self.spec, self.profile, self.slots, self.priority, self.chunk, self.itl_ms, self.reserved)
        p.truth, p.lag, p.lost = self.truth, self.lag, []  # the look-ahead runs without further failures
        p.workers = [w.clone() for w in self.workers]
        p.borrowed = {w.index: w for w in p.workers}
        p.live = [p.borrowed[w.index] for w in self.live]
        p.lanes = [deque(lane) for lane in self.lanes]
        p.queued, p.in_flight, p.seq = self.queued, self.in_flight, self.seq
        p.events = [(t, seq, kind, job.clone(p.borrowed)) for t, seq, kind, job in self.events]
        p.busy_cost = {}
        p.on_finish = lambda job, now, tokens: None
        return p

    def push(self, job: _Job) -> None:
        self.lanes[job.lane if self.priority else 0].append(job)
        self.queued += 1

    def pop(self, worker: _Worker | None = None) -> _Job:
        """The next job for a free slot of ``worker``: first from a lane below the first that has
        fewer jobs on it than its reserved slots, else from the most urgent non-empty lane."""
        self.queued -= 1
        short = (i for i in range(1, len(self.lanes)) if self.lanes[i] and worker is not None
                 and worker.by_lane[i] < self.reserved[i])
        job = self.lanes[next(short, None) or next(i for i, lane in enumerate(self.lanes) if lane)].popleft()
        # A copy must not start (mutate) the original run's queued jobs.
        return job.clone(self.borrowed) if self.borrowed is not None and not job.own else job

    def state(self, now: float) -> PoolState:
        """As the policy worker reads it: a dead worker's last heartbeat counts until it is
        ``lag`` old, and its jobs stay in the backlog (pending) until they are reclaimed."""
        n = len(self.live)
        if n < len(self.workers):
            n += sum(w.died is not None and now < w.died + self.lag for w in self.workers)
        queued = tuple(len(lane) for lane in self.lanes) if self.priority else ()
        return PoolState(backlog=self.queued + self.in_flight + len(self.lost), queued=queued, workers=n,
                         in_flight=self.in_flight, capacity=n * self.slots)

    def next_time(self) -> float:
        return self.events[0][0] if self.events else math.inf

    def _at(self, t: float, kind: int, job: _Job) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, job))

    def dispatch(self, now: float) -> None:
        """Start queued jobs while a worker has a free slot (the one with the most free slots first)."""
        while self.queued:
            worker: _Worker | None = None
            for w in self.live:
                if w.in_flight < w.slots and (worker is None or w.in_flight < worker.in_flight):
                    worker = w
            if worker is None:
                return
            job = self.pop(worker)
            worker.join(now, job.lane if self.priority else 0)
            self.in_flight += 1
            job.worker, job.start, job.concurrency, job.acc0 = worker, now, worker.in_flight, worker.acc
            job.attempts += 1
            truth = self.truth
            job.slow = truth.speed * worker.factor
            if truth.random:
                job.slow *= truth.luck(*job.luck)
            assert job.model is not None
            job.first_due = now + job.model.ttft(job.job.prompt_tokens, worker.in_flight) * job.slow / 1000
            self._at(job.first_due, _FIRST, job)

    def step(self) -> float:
        """Run the earliest event; returns its time."""
        now, _, kind, job = heapq.heappop(self.events)
        if kind == _FIRST:
            job.first = now
            job.remaining = 0 if job.job.kind == "embedding" else max(0, job.job.max_tokens - 1)
        else:
            job.remaining -= job.chunk
        job.last = now
        if job.remaining > 0:
            model, worker = job.model, job.worker
            assert model is not None and worker is not None
            key = (id(model), worker.in_flight)
            itl = self.itl_ms.get(key)
            if itl is None:
                itl = self.itl_ms[key] = model.itl(worker.in_flight)
            job.chunk = min(self.chunk, job.remaining)
            self._at(now + job.chunk * itl * job.slow / 1000, _CHUNK, job)
            return now
        worker = job.worker
        assert worker is not None
        worker.leave(now, job.lane if self.priority else 0)
        self.in_flight -= 1
        self._charge(job, worker)
        self.on_finish(job, now, 0 if job.job.kind == "embedding" else max(1, job.job.max_tokens))
        self.dispatch(now)
        return now

    def _charge(self, job: _Job, worker: _Worker) -> None:
        # A run cut short by its worker's death was paid for too: the job's cost is all its runs.
        spent = worker.acc - job.acc0
        job.cost += spent
        self.busy_cost[job.cls] = self.busy_cost.get(job.cls, 0.0) + spent

    def kill(self, now: float, count: int | None) -> list[_Worker]:
        """The ``count`` highest-indexed live workers (None: all) die now; their running jobs are
        lost (pending until :meth:`reclaim`). Returns the dead, for :meth:`revive`."""
        dead = self.live[len(self.live) - count:] if count is not None and count < len(self.live) else self.live
        if not dead:
            return []
        self.live = [w for w in self.live if w not in dead]
        gone = {id(w) for w in dead}
        kept: list[tuple[float, int, int, _Job]] = []
        for event in self.events:
            job = event[3]
            if job.worker is not None and id(job.worker) in gone:
                job.worker.leave(now, job.lane if self.priority else 0)
                self.in_flight -= 1
                self._charge(job, job.worker)
                job.worker, job.first, job.remaining, job.chunk = None, None, 0, 0
                self.lost.append(job)
            else:
                kept.append(event)
        heapq.heapify(kept)
        self.events = kept
        for w in dead:
            w.died = now
        return dead

    def reclaim(self, now: float, jobs: Sequence[_Job]) -> None:
        """A live peer takes over the lost ``jobs`` (still lost ones only): ahead of their lanes'
        queues, as a worker runs what it claims before it reads new entries."""
        back = [j for j in jobs if j in self.lost]
        self.lost = [j for j in self.lost if j not in back]
        for job in reversed(back):
            self.lanes[job.lane if self.priority else 0].appendleft(job)
        self.queued += len(back)
        self.dispatch(now)

    def revive(self, now: float, workers: Sequence[_Worker]) -> None:
        """``workers`` start again, empty (a fresh process beats at once)."""
        for w in workers:
            w.died, w.in_flight, w.by_lane = None, 0, [0] * len(w.by_lane)
            w.last = now
        self.live = sorted({*self.live, *workers}, key=lambda w: w.index)
        self.dispatch(now)


# --------------------------------------------------------------------------- a run


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
        self.pools = {name: _Pool(name, spec, fleet.get(name, 0), config.lane_shares, options.priority_queues,
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
        self.current: _Job | None = None
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
        job = arrival.job
        if arrival.hint is not None and job.slo_hint != arrival.hint:
            job = msgspec.structs.replace(job, slo_hint=arrival.hint)
        cls, _why = classify(job, self.config)
        luck = (0.0, 1.0) if self.luck is None else (self.luck.gauss(0.0, 1.0), self.luck.random())
        run = _Job(i, arrival.at, job, cls, self.config.lane(cls), luck)
        self.current = run
        decision = self.router.decide(job, cls, self._snapshot(), self.rng)
        self.current = None
        run.predicted = decision.predicted_ttft_ms
        if decision.shed:
            self._close(run, "rejected", decision.reason)
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
        self._count_routed(pool.name, run.lane)
        pool.push(run)
        pool.dispatch(self.now)

    def _finished(self, pool: _Pool) -> Finished:
        def done(job: _Job, now: float, tokens: int) -> None:
            self._close(job, "ok", "", pool=pool.name, tokens=tokens, now=now)
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

    def _close(self, job: _Job, status: Status, reason: str, *, pool: str | None = None, tokens: int = 0,
               now: float | None = None) -> None:
        f, started = job.job, job.worker is not None
        rec = JobRecord(
            id=job.i, cls=job.cls, tenant=f.tenant, model=f.model, kind=f.kind, prompt_tokens=f.prompt_tokens,
            max_tokens=f.max_tokens, arrival=job.arrival, status=status, reason=reason, pool=pool,
            worker=job.worker.index if job.worker is not None else None, start=job.start if started else None,
            first_token=job.first, finish=now if status == "ok" else None, output_tokens=tokens,
            concurrency=job.concurrency, cost_usd=job.cost, predicted_ttft_ms=job.predicted,
            attempts=max(1, job.attempts))
        self.records[job.i] = msgspec.structs.replace(rec, slo_met=meets(self.config.classes[job.cls], rec))

    def run(self, arrivals: Sequence[Arrival], stop: float) -> float:
        pools = list(self.pools.values())
        n, i = len(arrivals), 0
        interval = self.options.snapshot_interval_s
        while True:
            nxt: _Pool | None = None
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
        tokens = 0 if features.kind == "embedding" else max(1, features.max_tokens)
        fork = pool.clone()
        job = _Job(cur.i, cur.arrival, features, cur.cls, cur.lane, cur.luck)
        job.model, job.own = model, True
        done = False

        def finished(j: _Job, now: float, n: int) -> None:
            nonlocal done
            done = done or j is job

        fork.on_finish = finished
        fork.push(job)
        fork.dispatch(self.now)
        opts = self.options
        start_by = self.now + opts.oracle_horizon * self.config.classes[cur.cls].ttft_ms / 1000
        seen, steps = self.now, 0
        while not done and fork.events and steps < opts.oracle_events:
            t = fork.events[0][0]
            if job.worker is None and t > start_by:
                break
            if job.first is not None and job.last > job.first and t > job.first + opts.oracle_decode_s:
                break  # seen at least one decode chunk, and long enough
            seen = fork.step()
            steps += 1
        if job.worker is None:  # not started within the look-ahead: it waits at least this long
            if not fork.live:
                return OracleTruth(output_tokens=tokens, queue_wait_ms=math.inf)
            waited = start_by if steps < opts.oracle_events else seen
            return OracleTruth(output_tokens=tokens, queue_wait_ms=(waited - self.now) * 1000)
        decoded = max(0, tokens - 1) - job.remaining if job.first is not None else 0
        tpot = (job.last - job.first) * 1000 / decoded if job.first is not None and decoded > 0 else None
        return OracleTruth(output_tokens=tokens, ttft_ms=(job.first_due - job.start) * 1000, tpot_ms=tpot,
                           queue_wait_ms=(job.start - self.now) * 1000)


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


# --------------------------------------------------------------------------- metrics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def accelerator_pools(config: PolicyConfig) -> set[str]:
    """Pools on scarce specialised devices: those whose profile has a hard concurrency cap."""
    return {n for n, p in config.pools.items() if PROFILES[p.profile].max_concurrency is not None}


class ClassMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """One SLO class (or ``all``) over one run. Latencies over served jobs, in ms."""

    cls: str
    jobs: int
    served: int
    rejected: int
    failed: int
    """Failed or unfinished."""
    attainment: float
    """Share of *all* the class's jobs that met its target (rejected and failed ones did not)."""
    admitted_attainment: float
    """Share of the jobs admitted (all but the ``rejected``) that met the target: what admission
    control protects (1.0 when every job was shed)."""
    target: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    output_tokens: int
    cost_usd: float
    """The class's share of the provisioned fleet cost (see :func:`summarize`)."""
    cost_per_mtok: float | None
    """``cost_usd`` per million output tokens served."""
    busy_cost_per_mtok: float | None
    """Same, counting only the worker-time with a job in flight (an ideal autoscaler's bill)."""
    accel_share: float
    """Share of the served jobs that ran on accelerator pools."""


def _allocate(per_pool: Mapping[str, float], used: Mapping[str, Mapping[str, float]],
              tokens: Mapping[str, int]) -> dict[str, float]:
    """Split each pool's cost over classes by their share of its use (an unused pool: by tokens)."""
    out: dict[str, float] = {}
    total_tokens = sum(tokens.values())
    for name, cost in per_pool.items():
        by_class = used.get(name, {})
        total = sum(by_class.values())
        if total > 0:
            shares = {c: v / total for c, v in by_class.items()}
        elif total_tokens > 0:
            shares = {c: t / total_tokens for c, t in tokens.items()}
        else:
            continue
        for c, share in shares.items():
            out[c] = out.get(c, 0.0) + cost * share
    return out


def summarize(result: SimResult, config: PolicyConfig, accel: set[str] | None = None) -> dict[str, ClassMetrics]:
    """Per-class metrics plus ``all``, classes in config order.

    Cost is the *provisioned* fleet: every worker of every pool at its pool's
    ``cost_per_hour`` for the whole run (``max(duration, end)``), busy or idle, since that is
    what the fleet costs. Each pool's cost is split over classes in proportion to their busy
    cost there (each job's share of its worker while it ran, see :attr:`JobRecord.cost_usd`),
    so the idle time follows the use. ``busy_cost_per_mtok`` counts only the busy part: the
    bill of an ideal autoscaler that switches idle workers off.
    """
    accel = accelerator_pools(config) if accel is None else accel
    span_h = max(result.duration, result.end) / 3600
    by_class: dict[str, list[JobRecord]] = {}
    for rec in result.records:
        by_class.setdefault(rec.cls, []).append(rec)
    tokens = {c: sum(r.output_tokens for r in rs) for c, rs in by_class.items()}
    used = {n: u.busy_cost for n, u in result.usage.items()}
    provisioned = _allocate({n: u.workers * u.cost_per_hour * span_h for n, u in result.usage.items()}, used, tokens)
    busy: dict[str, float] = {}
    for u in result.usage.values():
        for c, v in u.busy_cost.items():
            busy[c] = busy.get(c, 0.0) + v

    def metrics(cls: str, recs: list[JobRecord], target: float | None) -> ClassMetrics:
        served = [r for r in recs if r.status == "ok"]
        admitted = [r for r in recs if r.status != "rejected"]
        ttft = [r.ttft_ms for r in served if r.ttft_ms is not None]
        e2e = [r.e2e_ms for r in served if r.e2e_ms is not None]
        out = sum(r.output_tokens for r in recs)
        cost = provisioned.get(cls, 0.0) if cls != "all" else sum(provisioned.values())
        busy_cost = busy.get(cls, 0.0) if cls != "all" else sum(busy.values())
        return ClassMetrics(
            cls=cls, jobs=len(recs), served=len(served), rejected=sum(r.status == "rejected" for r in recs),
            failed=sum(r.status in ("failed", "unfinished") for r in recs),
            attainment=sum(r.slo_met for r in recs) / len(recs) if recs else 0.0,
            admitted_attainment=sum(r.slo_met for r in admitted) / len(admitted) if admitted else 1.0, target=target,
            ttft_p50_ms=percentile(ttft, 0.5), ttft_p99_ms=percentile(ttft, 0.99),
            e2e_p50_ms=percentile(e2e, 0.5), e2e_p99_ms=percentile(e2e, 0.99), output_tokens=out,
            cost_usd=cost, cost_per_mtok=cost / out * 1e6 if out else None,
            busy_cost_per_mtok=busy_cost / out * 1e6 if out else None,
            accel_share=sum(r.pool in accel for r in served) / len(served) if served else 0.0)

    table = {c: metrics(c, by_class[c], config.classes[c].attainment) for c in config.classes if c in by_class}
    table["all"] = metrics("all", list(result.records), None)
    return table


def attainment(result: SimResult, cls: str) -> float:
    """Share of the jobs of class ``cls`` that met its target (1.0 if there were none)."""
    recs = [r for r in result.records if r.cls == cls]
    return sum(r.slo_met for r in recs) / len(recs) if recs else 1.0


class GoodputPoint(msgspec.Struct, frozen=True):
    multiplier: float
    rate: float
    attainment: float


class Goodput(msgspec.Struct, frozen=True, kw_only=True):
    """The highest arrival rate at which ``cls`` still met its attainment target."""

    cls: str
    target: float
    rate: float
    """Jobs/s; 0 when even the lowest rate tried missed the target."""
    multiplier: float
    """Of the workload's base rate."""
    capped: bool
    """The highest rate tried still met the target: the goodput is at least ``rate``."""
    points: list[GoodputPoint]
    """Every run, by multiplier."""


MULTIPLIERS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


def goodput(config: PolicyConfig, router: Callable[[], Router], workload: Workload, fleet: Mapping[str, int],
            seed: int, duration: float, *, cls: str = "interactive", multipliers: Sequence[float] = MULTIPLIERS,
            refine: int = 3, floor: float | None = None, options: SimOptions = DEFAULT_OPTIONS) -> Goodput:
    """Goodput by grid then bisection over rate multipliers of ``workload.rate``.

    The grid climbs until the first multiplier that misses the target; ``refine`` bisection
    steps then narrow the gap between the last pass and that miss. With ``floor``, the grid
    goes on past the miss while attainment stays at or above ``floor`` (points for a curve;
    the goodput is still set by the first miss). ``router`` makes a fresh router per run
    (they learn). The same seed at every rate: common random numbers.
    """
    target = config.classes[cls].attainment
    points: list[GoodputPoint] = []

    def run(m: float) -> float:
        result = simulate(config, router(), workload.scaled(m), fleet, seed, duration, options=options)
        got = attainment(result, cls)
        points.append(GoodputPoint(m, workload.rate * m, got))
        return got

    good, bad = 0.0, None
    grid = iter(sorted(multipliers))
    for m in grid:
        if run(m) < target:
            bad = m
            break
        good = m
    if bad is not None and floor is not None and points[-1].attainment >= floor:
        for m in grid:
            if run(m) < floor:
                break
    if bad is not None and good > 0:
        for _ in range(refine):
            mid = (good + bad) / 2
            good, bad = (mid, bad) if run(mid) >= target else (good, mid)
    points.sort(key=lambda p: p.multiplier)
    return Goodput(cls=cls, target=target, rate=workload.rate * good, multiplier=good, capped=bad is None,
                   points=points)
