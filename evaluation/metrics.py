"""The analysis of a run: per-class metrics (attainment, latency percentiles, cost per token,
accelerator share) from a :class:`~evaluation.records.SimResult`.

Cost is the provisioned fleet, split over classes by their use (see :func:`summarize`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import msgspec

from evaluation.records import JobRecord, SimResult
from policies.config import PolicyConfig
from policies.profiles import PROFILES


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
