"""Prometheus metrics of the roles: what each one counts, times and measures.

Every metric is defined here, once per process, on prometheus-client's default registry
(which also carries the ``process_*`` and ``python_*`` collectors). A role serves them
over HTTP when it has a metrics port (:mod:`cli.httpd`). docs/observability.md lists
them with their meaning; the Grafana dashboard in deploy/grafana/ is built on them.

Labels stay bounded: ``class`` (SLO classes of the policy file), ``pool`` (its pools),
``stream`` (the ingress and the pool lanes), ``reason`` (dead-letter reasons, a fixed
list) and ``role``. Never a job id or a consumer name: a series per job would grow without
bound. A class a pool worker has not heard of (a job written to a pool stream by hand)
is counted as ``other`` past :data:`MAX_CLASSES` distinct ones.

**Accounting.** Each job taken off the ingress is counted exactly once, by the role that
decided its outcome: the policy worker counts it ``routed``, ``shed``, ``expired``
(pool ``none``) or ``dead_lettered``; a routed job is then counted by the pool worker
that finished it as ``completed``, ``expired`` or ``dead_lettered``. So over a drained
stack, summed over every role::

    jobs taken in = completed + dead_lettered + shed + expired
    routed        = completed + dead_lettered + expired   (those of pool workers)

Duplicates (a redelivered entry whose job already has an outcome) count nothing.

**Hot path.** Labelled children are looked up once per class and pool and kept
(:class:`ClassMetrics`). The four timing histograms are :class:`LatencyHistogram`, not
prometheus-client's ``Histogram``: an observation is one C bisect and two additions with
no lock (about 0.3 us instead of 1.3 us), which is safe because a role observes and is
scraped on the one thread of its event loop. For the same reason the per-job counters of
completed jobs are plain integers read at scrape time (:class:`ClassCount`), and the
policy worker adds to its counters once per batch.
"""

from __future__ import annotations

import collections
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, Counter, Gauge, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.streams import group_backlog
from broker.topology import Topology

NONE = "none"
"""Label value for "no such thing": a job that expired before it had a pool, or was never classified."""
OTHER = "other"
"""Class label of jobs past the first :data:`MAX_CLASSES` distinct classes a process saw."""
MAX_CLASSES = 32

# Milliseconds (a TTFT on an idle accelerator) to ten minutes (a long batch generation in a
# deep queue); 0.5 s and 2 s are the default interactive and standard TTFT targets.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0,
                   10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Sub-millisecond (an accelerator decodes ~1,800 tok/s) to a second; 40 ms and 200 ms are
# the MLPerf interactive and server TPOT targets.
TPOT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, 1.0)

_NS = "inference_broker"
# No `_created` series next to every counter and histogram: they double the series count and
# Prometheus ignores them in the text format anyway.
disable_created_metrics()  # type: ignore[no-untyped-call]



class Buckets:
    """One labelled series of a :class:`LatencyHistogram`: counts per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. the smallest `le` bucket holding it.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class LatencyHistogram(Collector):
    """A Prometheus histogram labelled by class and pool, cheap to observe (see the module docstring)."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name = f"{_NS}_{name}"
        self.documentation = documentation
        self.bounds = sorted(buckets)
        self.series: dict[tuple[str, str], Buckets] = {}
        REGISTRY.register(self)

    def labels(self, slo: str, pool: str) -> Buckets:
        found = self.series.get((slo, pool))
        if found is None:
            found = self.series[(slo, pool)] = Buckets(self.bounds)
        return found

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=["class", "pool"])]

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["class", "pool"])
        for (slo, pool), series in list(self.series.items()):
            total, cumulative = 0, []
            for bound, count in zip([*map(_le, self.bounds), "+Inf"], series.counts, strict=True):
                total += count
                cumulative.append((bound, total))
            family.add_metric([slo, pool], cumulative, series.sum)
        return [family]


def _le(bound: float) -> str:
    return repr(float(bound))


class ClassCount(Collector):
    """A Prometheus counter labelled by class and pool, read at scrape time from an integer of
    each :class:`ClassMetrics`: counting a completed job is one addition, without the lock a
    prometheus-client counter takes (safe for the same reason as :class:`LatencyHistogram`)."""

    def __init__(self, name: str, documentation: str, read: Callable[[ClassMetrics], int]) -> None:
        self.name = f"{_NS}_{name}"
        self.documentation = documentation
        self.read = read
        REGISTRY.register(self)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=["class", "pool"])]

    def collect(self) -> list[Metric]:
        totals: dict[tuple[str, str], int] = {}
        for metrics in list(_CLASS_METRICS):
            key = (metrics.slo, metrics.pool)
            totals[key] = totals.get(key, 0) + self.read(metrics)
        family = CounterMetricFamily(self.name, self.documentation, labels=["class", "pool"])
        for (slo, pool), total in totals.items():
            family.add_metric([slo, pool], total)
        return [family]


_CLASS_METRICS: weakref.WeakSet[ClassMetrics] = weakref.WeakSet()
"""Every live :class:`ClassMetrics` of this process, for :class:`ClassCount` to read."""


# --- per-job timings (pool workers, jobs that completed) -------------------------------------
QUEUE_TIME = LatencyHistogram("queue_time_seconds", "Submission to start of inference (routing and queueing).",
                              LATENCY_BUCKETS)
TTFT = LatencyHistogram("time_to_first_token_seconds", "Submission to first output token.", LATENCY_BUCKETS)
TPOT = LatencyHistogram("time_per_output_token_seconds", "Mean gap between output tokens after the first "
                        "(jobs with two or more tokens).", TPOT_BUCKETS)
E2E = LatencyHistogram("e2e_latency_seconds", "Submission to last output token.", LATENCY_BUCKETS)

# --- outcomes ---------------------------------------------------------------------------------
ROUTED = Counter("jobs_routed", "Jobs the policy worker put on a pool's stream.",
                 ["class", "pool"], namespace=_NS)
COMPLETED = ClassCount("jobs_completed", "Jobs a pool worker ran to the end and answered with an ok result.",
                       lambda m: m.n_completed)
SLO_MET = ClassCount("slo_met", "Completed jobs that met every target of their class (TTFT, TPOT, end-to-end).",
                     lambda m: m.n_met)
FAILED = Counter("jobs_failed", "Runs that failed on the backend (each attempt; it may be retried after).",
                 ["class", "pool"], namespace=_NS)
RETRIED = Counter("jobs_retried", "Failed runs given back to the pool for another attempt after a backoff.",
                  ["class", "pool"], namespace=_NS)
DEAD = Counter("jobs_dead_lettered", "Jobs or entries moved to the dead-letter stream, by reason.",
               ["class", "reason"], namespace=_NS)
SHED = Counter("jobs_shed", "Jobs the policy worker rejected because no pool could meet their class.",
               ["class"], namespace=_NS)
EXPIRED = Counter("jobs_expired", "Jobs that ended expired: their deadline passed before routing "
                  "(pool none), in the pool's queue or while running.", ["class", "pool"], namespace=_NS)
RECLAIMED = Counter("entries_reclaimed", "Entries taken over from consumers that died or stalled, or "
                    "given back for a retry.", ["stream"], namespace=_NS)

# --- state ------------------------------------------------------------------------------------
ATTAINMENT = Gauge("slo_attainment_ratio", "Share of the jobs this worker completed that met their "
                   "class's targets, since it started.", ["class", "pool"], namespace=_NS)
IN_FLIGHT = Gauge("worker_in_flight", "Jobs this worker is running now.", ["pool"], namespace=_NS)
CAPACITY = Gauge("worker_capacity", "Jobs this worker runs at once at most (its concurrency).",
                 ["pool"], namespace=_NS)
COST_RATE = Gauge("cost_rate_dollars_per_hour", "What this worker costs while it lives (its pool's "
                  "cost_per_hour); the sum over live workers is the fleet's rate.", ["pool"], namespace=_NS)
BACKLOG = Gauge("stream_backlog", "Entries waiting on a stream: its group's lag (undelivered, Redis 7+) "
                "plus pending (delivered, not yet acked).", ["stream"], namespace=_NS)
PENDING = Gauge("stream_pending", "Entries delivered to a consumer and not yet acked.", ["stream"], namespace=_NS)
OLDEST_PENDING = Gauge("stream_oldest_pending_age_seconds", "Age of the oldest pending entry (0 when none).",
                       ["stream"], namespace=_NS)
LENGTH = Gauge("stream_length", "Entries on a stream now (XLEN); on stream dead, the dead letters kept.",
               ["stream"], namespace=_NS)
POOL_WORKERS = Gauge("pool_workers", "Workers of a pool with a fresh heartbeat, as the policy sees them.",
                     ["pool"], namespace=_NS)
REDIS_UP = Gauge("redis_up", "1 while this role's last Redis probe (PING within the last few seconds) "
                 "succeeded, else 0.", namespace=_NS)
READY = Gauge("ready", "1 while this role is ready (/readyz answers 200), else 0.", namespace=_NS)
ROLE = Info("role", "Which role this process runs (policy or worker) and, for a worker, its pool.",
            namespace=_NS)


class ClassMetrics:
    """The labelled children of one (class, pool): fetched once, then only incremented."""

    __slots__ = ("slo", "pool", "queue", "ttft", "tpot", "e2e", "failed", "retried", "expired",
                 "n_met", "n_completed", "__weakref__")

    def __init__(self, slo: str, pool: str) -> None:
        self.slo = slo
        self.pool = pool
        self.queue = QUEUE_TIME.labels(slo, pool)
        self.ttft = TTFT.labels(slo, pool)
        self.tpot = TPOT.labels(slo, pool)
        self.e2e = E2E.labels(slo, pool)
        self.failed = FAILED.labels(slo, pool)
        self.retried = RETRIED.labels(slo, pool)
        self.expired = EXPIRED.labels(slo, pool)
        self.n_met: int = 0
        self.n_completed: int = 0
        """Jobs completed and those that met their targets: the counters COMPLETED and SLO_MET."""
        _CLASS_METRICS.add(self)
        # Read at scrape time: nothing to update per job beyond the two integers.
        ATTAINMENT.labels(slo, pool).set_function(
            lambda: self.n_met / self.n_completed if self.n_completed else float("nan"))

    def complete(self, queue_ms: float, ttft_ms: float, tpot_ms: float | None, e2e_ms: float,
                 met: bool | None) -> None:
        """Count one completed job and record its timings."""
        self.n_completed += 1
        self.queue.observe(queue_ms / 1000)
        self.ttft.observe(ttft_ms / 1000)
        if tpot_ms is not None:
            self.tpot.observe(tpot_ms / 1000)
        self.e2e.observe(e2e_ms / 1000)
        if met:
            self.n_met += 1


class PoolMetrics:
    """A pool worker's instruments, one :class:`ClassMetrics` per class it has seen."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._classes: dict[str, ClassMetrics] = {}
        self._overflow: ClassMetrics | None = None
        self._dead: dict[tuple[str, str], Counter] = {}

    def of(self, slo: str | None) -> ClassMetrics:
        """The instruments of class ``slo`` (``none`` when unknown) on this pool."""
        key = slo or NONE
        found = self._classes.get(key)
        if found is None:
            if len(self._classes) >= MAX_CLASSES:
                return self._other()  # not cached under the stray name: the cache stays bounded too
            found = self._classes[key] = ClassMetrics(key, self.pool)
        return found

    def _other(self) -> ClassMetrics:
        if self._overflow is None:
            self._overflow = ClassMetrics(OTHER, self.pool)
        return self._overflow

    def dead(self, slo: str | None, reason: str) -> Counter:
        """The dead-letter counter of ``reason`` for class ``slo``."""
        return dead_counter(self._dead, slo, reason)


class PolicyMetrics:
    """A policy worker's instruments, cached per class and pool (both from the policy file)."""

    def __init__(self) -> None:
        self._routed: dict[tuple[str, str], Counter] = {}
        self._shed: dict[str, Counter] = {}
        self._expired: dict[str, Counter] = {}
        self._dead: dict[tuple[str, str], Counter] = {}

    def routed(self, slo: str, pool: str) -> Counter:
        found = self._routed.get((slo, pool))
        if found is None:
            found = self._routed[(slo, pool)] = ROUTED.labels(slo, pool)
        return found

    def shed(self, slo: str) -> Counter:
        found = self._shed.get(slo)
        if found is None:
            found = self._shed[slo] = SHED.labels(slo)
        return found

    def expired(self, slo: str) -> Counter:
        """Expired before routing: there is no pool yet."""
        found = self._expired.get(slo)
        if found is None:
            found = self._expired[slo] = EXPIRED.labels(slo, NONE)
        return found

    def dead(self, slo: str | None, reason: str) -> Counter:
        return dead_counter(self._dead, slo, reason)


def dead_counter(cache: dict[tuple[str, str], Counter], slo: str | None, reason: str) -> Counter:
    """``jobs_dead_lettered{class, reason}``, cached in ``cache`` (bounded like the classes)."""
    key = (slo or NONE, reason)
    found = cache.get(key)
    if found is None:
        if len(cache) >= MAX_CLASSES * 8:  # classes x the few reasons; beyond, a stray class name
            return DEAD.labels(OTHER, reason)
        found = cache[key] = DEAD.labels(key[0], reason)
    return found


def _entry_s(entry_id: object) -> float | None:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    head = raw.split("-", 1)[0]
    return int(head) / 1000 if head.isdigit() else None


async def export_streams(client: aioredis.Redis, shards: Sequence[tuple[Topology, Mapping[str, str]]]) -> None:
    """Set the stream gauges from Redis, in one round trip.

    Each shard's ``streams`` maps a stream key of the shard to the broker's group on it; the
    ``stream`` label is the key without the shard's base (``jobs``, ``pool:gpu``,
    ``pool:gpu:1``), so a stream's gauges sum its shards (the oldest pending: the oldest of
    any shard). The backlog is the group's unread and pending entries
    (:func:`broker.streams.group_backlog`).
    """
    pipe = client.pipeline(transaction=False)
    for topo, streams in shards:
        for key, group in streams.items():
            pipe.xlen(key)
            pipe.xinfo_groups(key)
            pipe.xpending(key, group)
        pipe.xlen(topo.dead)
    replies = iter(await pipe.execute(raise_on_error=False))
    now = time.time()
    backlog: collections.Counter[str] = collections.Counter()
    pending: collections.Counter[str] = collections.Counter()
    length: collections.Counter[str] = collections.Counter()
    oldest: dict[str, float] = {}
    for topo, streams in shards:
        for key, group in streams.items():
            size, info, summary = next(replies), next(replies), next(replies)
            queued, held = group_backlog(info, size, group)
            name = key.removeprefix(topo.base + ":")
            backlog[name] += queued + held
            pending[name] += held
            length[name] += size if isinstance(size, int) else 0
            first = _entry_s(summary.get("min")) if isinstance(summary, dict) and summary.get("min") else None
            oldest[name] = max(oldest.get(name, 0.0), now - first if first is not None else 0.0)
        dead = next(replies)
        length[topo.dead.removeprefix(topo.base + ":")] += dead if isinstance(dead, int) else 0
    for name, value in backlog.items():
        BACKLOG.labels(name).set(value)
        PENDING.labels(name).set(pending[name])
        OLDEST_PENDING.labels(name).set(max(0.0, oldest[name]))
    for name, value in length.items():
        LENGTH.labels(name).set(value)
