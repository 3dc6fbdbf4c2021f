"""Summaries of a set of results: per SLO class and per pool, as `report` and `top` show them.

Definitions used everywhere these numbers appear:

* **Percentiles** are nearest-rank over the jobs that have timings (``ok`` results), the
  same as the demo's table: p99 of 50 values is the largest.
* **Attainment** is the share of *all* a class's jobs that met its target: a failed, expired,
  rejected or cancelled job counts as a miss, as in the simulator (a producer that cancels
  has often waited too long).
* **Cost** is busy cost: a worker costs its pool's ``cost_per_hour`` and the jobs running on
  it split that evenly at each instant (``policies.estimate.job_cost`` integrated over a
  job's life, from the result timings of every job on the same worker).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import msgspec

from broker.wire import DECODE_ERRORS, Result, decode_result
from policies.config import PolicyConfig

STATUSES = ("ok", "failed", "expired", "rejected", "cancelled")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class GroupStats(msgspec.Struct, frozen=True, kw_only=True):
    """What one group of results (a class, a pool, or a class on a pool) looked like."""

    name: str
    jobs: int
    statuses: dict[str, int]
    """Count per status (every status present, zeros included)."""
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    met: int
    """Jobs that met their class's target."""
    output_tokens: int
    cost_usd: float | None
    """Busy cost of the group's jobs; None when no job ran on a pool with a known price."""

    @property
    def attainment(self) -> float | None:
        """Share of the group's jobs that met their target (every outcome counts)."""
        return self.met / self.jobs if self.jobs else None

    @property
    def cost_per_mtok(self) -> float | None:
        """Busy dollars per million output tokens."""
        if self.cost_usd is None or not self.output_tokens:
            return None
        return self.cost_usd * 1e6 / self.output_tokens


def group_stats(name: str, results: Sequence[Result], costs: Mapping[str, float] | None = None) -> GroupStats:
    """Counts, percentiles, attainment and (with ``costs`` per job id) cost of ``results``."""
    metrics = [r.metrics for r in results if r.metrics is not None]
    ttft = [m.time_to_first_token_ms for m in metrics]
    e2e = [m.e2e_latency_ms for m in metrics]
    statuses = dict.fromkeys(STATUSES, 0)
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    priced = [costs[r.id] for r in results if costs is not None and r.id in costs]
    return GroupStats(
        name=name, jobs=len(results), statuses=statuses,
        ttft_p50_ms=percentile(ttft, 0.5), ttft_p99_ms=percentile(ttft, 0.99),
        e2e_p50_ms=percentile(e2e, 0.5), e2e_p99_ms=percentile(e2e, 0.99),
        met=sum(r.slo_met is True for r in results),
        output_tokens=sum(r.usage.completion_tokens for r in results if r.status == "ok"),
        cost_usd=sum(priced) if priced else None)


def by_key(results: Iterable[Result], key: str) -> dict[str, list[Result]]:
    """Results grouped by ``slo`` (class) or ``pool``; a job that ran nowhere is under its status."""
    groups: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        value = r.slo if key == "slo" else r.pool
        groups[value or (r.status if key == "pool" else "-")].append(r)
    return dict(sorted(groups.items()))


def busy_costs(results: Iterable[Result], price_per_hour: Mapping[str, float]) -> dict[str, float]:
    """Dollars per job id: its even share of its worker's hourly price while it ran.

    Jobs on one worker overlap; between two consecutive start/finish instants each of the
    ``n`` jobs running pays ``1/n`` of the worker's rate. Jobs on pools without a price, or
    without timings, get no entry.
    """
    per_worker: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in results:
        if r.timing is not None and r.pool is not None and r.pool in price_per_hour and r.worker:
            per_worker[(r.pool, r.worker)].append(r)
    costs: dict[str, float] = {}
    for (pool, _worker), jobs in per_worker.items():
        rate = price_per_hour[pool] / 3600
        events = sorted([(r.timing.started_at, 1, r.id) for r in jobs if r.timing] +
                        [(r.timing.finished_at, -1, r.id) for r in jobs if r.timing])
        running: set[str] = set()
        last = events[0][0] if events else 0.0
        for at, change, job_id in events:
            if running:
                share = rate * (at - last) / len(running)
                for other in running:
                    costs[other] = costs.get(other, 0.0) + share
            last = at
            if change > 0:
                running.add(job_id)
                costs.setdefault(job_id, 0.0)
            else:
                running.discard(job_id)
    return costs


def results_of(entries: Iterable[tuple[bytes, Mapping[bytes, bytes]]]) -> list[Result]:
    """The results among result-stream entries; entries without one, or undecodable, are skipped."""
    out = []
    for _id, fields in entries:
        raw = fields.get(b"result")
        if raw is not None:
            try:
                out.append(decode_result(raw))
            except DECODE_ERRORS:
                continue  # not ours to judge here; `inference-broker results` shows it
    return out


def span_text(p50: float | None, p99: float | None) -> str:
    """``p50/p99`` in one cell, in ms or s, whichever reads better."""
    if p50 is None or p99 is None:
        return "-"
    if p99 >= 1000:
        return f"{p50 / 1000:.2f}/{p99 / 1000:.2f} s"
    return f"{p50:.0f}/{p99:.0f} ms"


class Report(msgspec.Struct, kw_only=True):
    """Everything the page shows, computed once."""

    title: str
    results: list[Result]
    config: PolicyConfig
    classes: list[GroupStats]
    pools: list[GroupStats]
    cells: dict[str, list[GroupStats]]
    """Per class: one entry per pool it ran on."""
    costs: dict[str, float]
    start: float | None
    """Earliest submission among the results with timings (the time axis' zero)."""
    span_s: float
    """First submission to last finish."""
    submit_span_s: float
    """First to last submission: the range of the time-binned figures."""
    untimed: int
    """Results without timings (not run): counted in the tables, absent from the time plots."""


def build(results: Sequence[Result], config: PolicyConfig, title: str = "inference-broker run") -> Report:
    """Summaries of ``results`` for the tables and figures."""
    prices = {name: pool.cost_per_hour for name, pool in config.pools.items()}
    costs = busy_costs(results, prices)
    timed = [r for r in results if r.timing is not None]
    start = min((r.timing.created_at for r in timed if r.timing), default=None)
    end = max((r.timing.finished_at for r in timed if r.timing), default=None)
    last = max((r.timing.created_at for r in timed if r.timing), default=None)
    classes = by_key(results, "slo")
    return Report(
        title=title, results=list(results), config=config, costs=costs,
        classes=[group_stats(name, rows, costs) for name, rows in classes.items()],
        pools=[group_stats(name, rows, costs) for name, rows in by_key(results, "pool").items()],
        cells={name: [group_stats(pool, cell, costs) for pool, cell in by_key(rows, "pool").items()]
               for name, rows in classes.items()},
        start=start, span_s=(end - start) if start is not None and end is not None else 0.0,
        submit_span_s=(last - start) if start is not None and last is not None else 0.0,
        untimed=len(results) - len(timed))
