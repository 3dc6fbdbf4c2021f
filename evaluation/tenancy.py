"""Tenants in the simulator: per-tenant metrics of a run, and the noisy-neighbour scenario.

The scenario (``inference-broker simulate --scenario noisy-neighbour``): two tenants send
interactive chat (one class), ``acme`` well within its quota and ``bulk`` at ten times its
quota. It runs in four variants, acme's arrivals identical in each (its own random stream):

* ``alone``: acme by itself, quotas configured;
* ``quotas``: both, with the quotas and the fair share (``[tenants.*]`` as configured here);
* ``fair-share``: both, the tenants listed with their weights but no limits: only the
  token-fair share (VTC) holds bulk back, and only while the pool is contended;
* ``none``: both, no tenants configured: today's single-tenant broker.

The claim it checks (issue 19): with quotas, acme's attainment stays within 3 points of what it
gets alone, and bulk's refusals carry a retry-after.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from evaluation.metrics import percentile
from evaluation.records import SimResult
from evaluation.workloads import CONVERSATION, Arrival, Component, Poisson, SeededRandom, Workload
from policies.config import PolicyConfig, TenantSpec


class TenantMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """One tenant over one run. Latencies over served jobs, in ms."""

    tenant: str
    jobs: int
    served: int
    rejected: int
    """By admission of any kind: quota, fair share or the SLO router's shedding."""
    quota: int
    """Of those, refused by the tenant's quotas."""
    fair_share: int
    """Of those, refused by the fair share."""
    attainment: float
    """Share of all its jobs that met their class's target (rejected ones did not)."""
    admitted_attainment: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tokens: int
    """Prompt plus output tokens of its served jobs."""
    retry_after_p50_s: float | None
    """Median retry hint of its rejected jobs (None: none rejected, or none with a hint)."""
    retry_hinted: float
    """Share of its rejected jobs that carry a retry hint (1.0 when none was rejected)."""


def by_tenant(result: SimResult) -> dict[str, TenantMetrics]:
    """Per-tenant metrics of ``result``, tenants by name."""
    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(result.records):
        groups.setdefault(rec.tenant, []).append(i)
    out: dict[str, TenantMetrics] = {}
    for tenant in sorted(groups):
        recs = [result.records[i] for i in groups[tenant]]
        served = [r for r in recs if r.status == "ok"]
        refused = [r for r in recs if r.status == "rejected"]
        admitted = [r for r in recs if r.status != "rejected"]
        hints = [r.retry_after_s for r in refused if r.retry_after_s is not None]
        ttft = [r.ttft_ms for r in served if r.ttft_ms is not None]
        out[tenant] = TenantMetrics(
            tenant=tenant, jobs=len(recs), served=len(served), rejected=len(refused),
            quota=sum(r.reason.startswith("quota:") for r in refused),
            fair_share=sum(r.reason.startswith("fair share:") for r in refused),
            attainment=sum(r.slo_met for r in recs) / len(recs),
            admitted_attainment=sum(r.slo_met for r in admitted) / len(admitted) if admitted else 1.0,
            ttft_p50_ms=percentile(ttft, 0.5), ttft_p99_ms=percentile(ttft, 0.99),
            tokens=sum(r.prompt_tokens + r.output_tokens for r in served),
            retry_after_p50_s=percentile(hints, 0.5), retry_hinted=len(hints) / len(refused) if refused else 1.0)
    return out


VARIANTS = ("alone", "quotas", "fair-share", "none")


class NoisyNeighbour(msgspec.Struct, frozen=True, kw_only=True):
    """Two tenants in one class: ``quiet`` within its quota, ``noisy`` at ``flood`` times its own."""

    name: str = "noisy-neighbour"
    description: str = ("acme (8 jobs/s, about half its quota) beside bulk sending 10x its quota (8 jobs/s, "
                        "750k tokens/min), interactive chat on one GPU and one accelerator")
    quiet: str = "acme"
    noisy: str = "bulk"
    quiet_rate: float = 8.0
    quiet_spec: TenantSpec = TenantSpec(jobs_per_s=16.0, tokens_per_min=1_500_000.0)
    noisy_spec: TenantSpec = TenantSpec(jobs_per_s=8.0, tokens_per_min=750_000.0)
    """About 1,560 tokens a job (the conversation shape's mean prompt plus output): 8 jobs/s."""
    flood: float = 10.0
    """``noisy`` offers this many times its ``jobs_per_s``."""
    hint: str = "interactive"
    fleet: tuple[tuple[str, int], ...] = (("gpu", 1), ("accel", 1))
    """Its fleet unless one is given: small enough that the flood, unchecked, overloads it."""

    def arrivals(self, seed: int, duration: float, variant: str) -> list[Arrival]:
        """The jobs of ``variant``: the quiet tenant's are the same in every variant."""
        quiet = self._workload(self.quiet, self.quiet_rate).generate(SeededRandom(seed, stream=10), duration)
        if variant == "alone":
            return list(quiet)
        rate = (self.noisy_spec.jobs_per_s or self.quiet_rate) * self.flood
        noisy = self._workload(self.noisy, rate).generate(SeededRandom(seed, stream=11), duration)
        return sorted([*quiet, *noisy], key=lambda a: a.at)

    def config(self, base: PolicyConfig, variant: str) -> PolicyConfig:
        """``base`` with this scenario's tenants as ``variant`` configures them."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}")
        if variant == "none":
            tenants: dict[str, TenantSpec] = {}
        elif variant == "fair-share":
            tenants = {self.quiet: TenantSpec(weight=self.quiet_spec.weight),
                       self.noisy: TenantSpec(weight=self.noisy_spec.weight)}
        else:
            tenants = {self.quiet: self.quiet_spec, self.noisy: self.noisy_spec}
        return msgspec.structs.replace(base, tenants=tenants)

    def _workload(self, tenant: str, rate: float) -> Workload:
        component = Component(share=1.0, shape=CONVERSATION, hint=self.hint, tenant=tenant)
        return Workload(name=f"{self.name}-{tenant}", description=f"{tenant}'s chat", rate=rate, arrivals=Poisson(),
                        components=(component,))


TENANT_SCENARIOS: dict[str, NoisyNeighbour] = {s.name: s for s in (NoisyNeighbour(),)}
"""Scenarios of tenants (``inference-broker simulate --scenario NAME``)."""


def within(alone: TenantMetrics, beside: TenantMetrics, points: float = 3.0) -> bool:
    """Whether ``beside``'s attainment is within ``points`` percentage points below ``alone``'s."""
    return beside.attainment >= alone.attainment - points / 100


def variant_table(results: Sequence[tuple[str, SimResult]]) -> list[tuple[str, TenantMetrics]]:
    """(variant, metrics) rows, tenants by name within each variant."""
    return [(variant, m) for variant, result in results for m in by_tenant(result).values()]
