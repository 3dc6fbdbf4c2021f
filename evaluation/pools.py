"""One simulated pool: its workers, its priority-lane queues and its device events.

A pool has ``fleet[pool]`` workers, each a continuous-batching device running up to
``min(concurrency, device cap)`` jobs at once; a queued job goes to the worker with the most
free slots. The device model mirrors ``workers.simulated.SimulatedBackend`` step for step, so
that live and simulated runs agree:

* TTFT is ``profile.ttft(prompt, in_flight)`` read once when the job starts (its own slot
  counted);
* decoding advances in chunks of :data:`~evaluation.options.DECODE_CHUNK` tokens, each taking
  ``chunk * profile.itl(in_flight)`` with the worker's in-flight count re-read at the start
  of every chunk: jobs slow down as others join and speed up as they leave;
* a job produces ``max(1, max_tokens)`` tokens; an embedding none, finishing at its first token;
* every device time is multiplied by the pool's :class:`~evaluation.options.DeviceTruth`
  (its speed, a slow node's factor, the job's luck).

Each pool has one FIFO queue per priority lane (``PolicyConfig.lane``: one per distinct class
priority), and a free slot takes, as the live workers read: the head of a lane below the first
that runs fewer jobs on that worker than its reserved slots (``policies.config.reserved_slots``
of its classes' ``min_share``), else the head of the most urgent non-empty lane.

Events live in one heap per pool keyed by (time, sequence). A pool can be copied
(:meth:`SimPool.clone`) and the copy run forward without touching the original: the oracle's
look-ahead. Workers die and come back (:meth:`SimPool.kill`, :meth:`SimPool.reclaim`,
:meth:`SimPool.revive`) as the run's failures say.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from evaluation.options import DeviceTruth
from policies.config import PoolSpec, reserved_slots
from policies.profiles import PROFILES, ModelProfile
from policies.route import JobFeatures, PoolState

_FIRST, _CHUNK = 0, 1
"""Kinds of device event: a job's first token, the end of one of its decode chunks."""


class SimWorker:
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

    def clone(self) -> SimWorker:
        w = SimWorker(self.index, self.slots, 0.0, 0, self.factor)
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


class SimJob:
    __slots__ = ("acc0", "arrival", "attempts", "chunk", "cls", "concurrency", "cost", "first", "first_due", "i",
                 "job", "lane", "last", "luck", "model", "own", "predicted", "remaining", "slow", "start", "worker")

    def __init__(self, i: int, arrival: float, job: JobFeatures, cls: str, lane: int,
                 luck: tuple[float, float] = (0.0, 1.0)) -> None:
        self.i, self.arrival, self.job, self.cls, self.lane, self.luck = i, arrival, job, cls, lane, luck
        """``luck``: the job's (normal, uniform) draws for its device's noise and tail (``DeviceTruth.luck``)."""
        self.worker: SimWorker | None = None
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

    def clone(self, workers: Mapping[int, SimWorker]) -> SimJob:
        j = SimJob(self.i, self.arrival, self.job, self.cls, self.lane, self.luck)
        j.worker = None if self.worker is None else workers[self.worker.index]
        j.model, j.start, j.first_due, j.last, j.acc0 = self.model, self.start, self.first_due, self.last, self.acc0
        j.first, j.remaining, j.chunk, j.concurrency = self.first, self.remaining, self.chunk, self.concurrency
        j.slow, j.attempts, j.cost = self.slow, self.attempts, self.cost
        return j


Finished = Callable[[SimJob, float, int], None]


class SimPool:
    """One pool's workers, queue and events: the device model in one place (runs and look-aheads)."""

    def __init__(self, name: str, spec: PoolSpec, workers: int, shares: Sequence[float], priority: bool,
                 chunk: int, truth: DeviceTruth | None = None, heartbeat_lag_s: float = 0.0) -> None:
        self.name, self.spec, self.profile = name, spec, PROFILES[spec.profile]
        cap = self.profile.max_concurrency
        self.slots = spec.concurrency if cap is None else min(spec.concurrency, cap)
        lanes = len(shares) if priority else 1
        self.truth = truth or DeviceTruth()
        slow = self.truth.slow_workers
        self.workers = [SimWorker(i, self.slots, spec.cost_per_hour, lanes, self.truth.slow_factor if i < slow else 1.0)
                        for i in range(workers)]
        self.live = list(self.workers)
        """The workers running now, by index (all of them unless ``SimOptions.failures``)."""
        self.lag = heartbeat_lag_s
        self.lost: list[SimJob] = []
        """Jobs of dead workers, pending on the stream until a peer reclaims them."""
        self.priority, self.chunk = priority, chunk
        self.lanes: list[deque[SimJob]] = [deque() for _ in range(lanes)]
        """Waiting jobs by priority lane, most urgent first (one FIFO without ``priority``)."""
        self.reserved = reserved_slots(shares, self.slots) if priority else (0,)
        """Slots of each worker that each lane keeps for its own work, as the live workers'."""
        self.queued = self.in_flight = self.seq = 0
        self.events: list[tuple[float, int, int, SimJob]] = []
        self.busy_cost: dict[str, float] = {}
        self.on_finish: Finished = lambda job, now, tokens: None
        self.itl_ms: dict[tuple[int, int], float] = {}
        """ITL by (id of the model profile, jobs in flight): memoised, the hot path of every chunk."""
        self.borrowed: dict[int, SimWorker] | None = None
        """In a copy: its workers by index. The queue still holds the original's jobs, copied as they start."""

    def clone(self) -> SimPool:
        """A copy to run forward without touching this one."""
        p = SimPool.__new__(SimPool)
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

    def push(self, job: SimJob) -> None:
        self.lanes[job.lane if self.priority else 0].append(job)
        self.queued += 1

    def pop(self, worker: SimWorker | None = None) -> SimJob:
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

    def _at(self, t: float, kind: int, job: SimJob) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, job))

    def dispatch(self, now: float) -> None:
        """Start queued jobs while a worker has a free slot (the one with the most free slots first)."""
        while self.queued:
            worker: SimWorker | None = None
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

    def _charge(self, job: SimJob, worker: SimWorker) -> None:
        # A run cut short by its worker's death was paid for too: the job's cost is all its runs.
        spent = worker.acc - job.acc0
        job.cost += spent
        self.busy_cost[job.cls] = self.busy_cost.get(job.cls, 0.0) + spent

    def kill(self, now: float, count: int | None) -> list[SimWorker]:
        """The ``count`` highest-indexed live workers (None: all) die now; their running jobs are
        lost (pending until :meth:`reclaim`). Returns the dead, for :meth:`revive`."""
        dead = self.live[len(self.live) - count:] if count is not None and count < len(self.live) else self.live
        if not dead:
            return []
        self.live = [w for w in self.live if w not in dead]
        gone = {id(w) for w in dead}
        kept: list[tuple[float, int, int, SimJob]] = []
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

    def reclaim(self, now: float, jobs: Sequence[SimJob]) -> None:
        """A live peer takes over the lost ``jobs`` (still lost ones only): ahead of their lanes'
        queues, as a worker runs what it claims before it reads new entries."""
        back = [j for j in jobs if j in self.lost]
        self.lost = [j for j in self.lost if j not in back]
        for job in reversed(back):
            self.lanes[job.lane if self.priority else 0].appendleft(job)
        self.queued += len(back)
        self.dispatch(now)

    def revive(self, now: float, workers: Sequence[SimWorker]) -> None:
        """``workers`` start again, empty (a fresh process beats at once)."""
        for w in workers:
            w.died, w.in_flight, w.by_lane = None, 0, [0] * len(w.by_lane)
            w.last = now
        self.live = sorted({*self.live, *workers}, key=lambda w: w.index)
        self.dispatch(now)
