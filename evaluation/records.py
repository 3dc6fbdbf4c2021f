"""What a simulated run produces: one record per job and each pool's usage.

:func:`meets` is the SLO verdict on a record, the same rule the live worker applies
(``workers.outcomes.slo_met``), so that live runs turned into records (``bench.live_vs_sim``)
are judged alike.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from policies.config import SLOClass

Status = Literal["ok", "rejected", "failed", "unfinished"]


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
    retry_after_s: float | None = None
    """A rejected job: when sending it again may succeed (admission's or a tenant quota's hint)."""

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
    """Every target that is set holds (as ``workers.outcomes.slo_met``); only served jobs can."""
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
