"""Per-tenant quotas and a token-weighted fair share, decided at admission.

:class:`TenantLedger` admits or refuses each routed job of a tenant listed in
``[tenants.<name>]`` (``PolicyConfig.tenants``); jobs of other tenants, ``default`` included,
are never limited. Time comes in as an argument (``now``, seconds on any clock), so the same
ledger runs in the live policy worker and in the simulator.

* **Rate quotas** are token buckets, one for jobs per second and one for tokens per minute
  (a job counts its prompt tokens plus its ``max_tokens``, the sizes ``JobFeatures`` carries),
  ``burst_s`` seconds of rate deep. A job is admitted when its bucket holds it, or, for a job
  bigger than the whole bucket, when the bucket is full (it then runs the bucket into debt,
  so the sustained rate still holds). A refusal says when the bucket will hold it
  (``retry_after_s``).
* **Concurrent jobs**: the ids admitted and not yet finished, per tenant. :meth:`finished`
  frees one; the live shell also drops the ids whose result exists (:meth:`outstanding`).
* **Fair share** within a lane, after the Virtual Token Counter (Sheng et al., "Fairness in
  Serving Large Language Models", OSDI 2024): each tenant has a counter per lane, charged
  ``tokens / weight`` at admission. A tenant that becomes active in the lane (no job of it
  outstanding there) is lifted to the smallest counter of the active others, so idling banks
  no credit; nor may a tenant that stays active with light use trail them by more than
  ``credit``. When the job's pool is contended (it would queue, see :func:`contended`), a
  tenant more than ``allowance`` ahead of the least-served active tenant is refused until
  that one catches up. Uncontended, every job is admitted: the share only decides who waits.

``share`` (0-1] scales every limit: each of P policy workers enforces 1/P of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec

from policies.config import PolicyConfig, TenantSpec
from policies.route import JobFeatures, PoolState, Snapshot
from policies.slo import pool_capacity

ALLOWANCE = 8192.0
"""Virtual tokens (tokens per unit of weight) a tenant may run ahead of the least-served one in
a contended lane: a few jobs' worth, so that job sizes do not make the share jitter."""
CREDIT = 8 * ALLOWANCE
"""How far a tenant that stays active may trail the least-served other active tenant: light
use banks at most this much priority for a later flood (a returning tenant banks none)."""
SPEED_TAU_S = 5.0
"""Time constant of each counter's speed (what a fair-share retry hint is computed from)."""
RETRY_BOUNDS_S = (0.5, 30.0)
"""A fair-share retry hint is clamped to these bounds: it is an estimate."""
CONCURRENT_RETRY_S = 1.0
"""Retry hint of a job refused for a tenant's concurrent limit: nothing says when one finishes."""
MAX_OUTSTANDING = 65_536
"""Ids kept per tenant when nothing reports them finished: beyond this the oldest are dropped."""
FORGET_S = 60.0
"""A tenant with nothing outstanding and no admission for this long is forgotten (buckets
full again, counters lifted on return anyway): state stays bounded by the active tenants."""


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    """Whether a job may run now; a refusal says why and when sending it again may succeed."""

    admitted: bool
    reason: str = ""
    retry_after_s: float | None = None


ADMITTED = Admission(admitted=True)


def job_tokens(job: JobFeatures) -> int:
    """What a job counts against a tenant's tokens: its prompt plus its most output."""
    return max(0, job.prompt_tokens) + max(0, job.max_tokens)


def contended(config: PolicyConfig, snapshot: Snapshot, pool: str, lane: int) -> bool:
    """Whether a job of ``lane`` routed to ``pool`` would queue: the work ahead of it fills the pool."""
    state = snapshot.pools.get(pool, PoolState())
    return state.ahead(lane) >= pool_capacity(config, pool, state)


def _hint(seconds: float) -> float:
    return max(0.001, math.ceil(seconds * 1000 - 1e-6) / 1000)  # whole ms, up (not past float noise)


class _Bucket:
    __slots__ = ("at", "depth", "level", "rate")

    def __init__(self, rate: float, burst_s: float, now: float) -> None:
        self.rate, self.depth, self.at = rate, rate * burst_s, now
        self.level = self.depth

    def wait(self, cost: float, now: float) -> float:
        """Seconds until the bucket holds ``cost`` (a full bucket holds anything); 0: now."""
        if now > self.at:
            self.level = min(self.depth, self.level + (now - self.at) * self.rate)
            self.at = now
        need = min(cost, self.depth)
        return 0.0 if self.level >= need - 1e-9 else (need - self.level) / self.rate


class _Tenant:
    __slots__ = ("concurrent", "jobs", "last", "outstanding", "spec", "tokens")

    def __init__(self, spec: TenantSpec, share: float, now: float) -> None:
        self.spec, self.last = spec, now
        self.jobs = None if spec.jobs_per_s is None else _Bucket(spec.jobs_per_s * share, spec.burst_s, now)
        self.tokens = None if spec.tokens_per_min is None else _Bucket(spec.tokens_per_min / 60 * share,
                                                                       spec.burst_s, now)
        self.concurrent = None if spec.concurrent is None else max(1, math.floor(spec.concurrent * share + 1e-9))
        self.outstanding: dict[str, int] = {}
        """Admitted job ids not yet finished, oldest first, with their lane."""


class _Lane:
    """The fair-share counters of one lane: per tenant, its counter, jobs outstanding, speed."""

    __slots__ = ("active", "counter", "speed")

    def __init__(self) -> None:
        self.counter: dict[str, float] = {}
        self.active: dict[str, int] = {}
        self.speed: dict[str, tuple[float, float]] = {}
        """Per tenant (virtual tokens per second, as of when), decaying with SPEED_TAU_S."""

    def least(self, tenant: str) -> tuple[str, float] | None:
        """The active tenant other than ``tenant`` with the smallest counter, and that counter."""
        others = [(self.counter.get(t, 0.0), t) for t, n in self.active.items() if n > 0 and t != tenant]
        if not others:
            return None
        value, name = min(others)
        return name, value

    def charge(self, tenant: str, amount: float, now: float) -> None:
        self.counter[tenant] = self.counter.get(tenant, 0.0) + amount
        rate, at = self.speed.get(tenant, (0.0, now))
        self.speed[tenant] = (rate * math.exp(-max(0.0, now - at) / SPEED_TAU_S) + amount / SPEED_TAU_S, now)

    def rate(self, tenant: str, now: float) -> float:
        rate, at = self.speed.get(tenant, (0.0, now))
        return rate * math.exp(-max(0.0, now - at) / SPEED_TAU_S)


class TenantLedger:
    """Quotas and fair share of the tenants of ``tenants`` (see the module docs)."""

    def __init__(self, tenants: Mapping[str, TenantSpec], *, share: float = 1.0,
                 allowance: float = ALLOWANCE, credit: float = CREDIT) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share}")
        self.specs, self.share, self.allowance, self.credit = dict(tenants), share, allowance, max(credit, allowance)
        self._tenants: dict[str, _Tenant] = {}
        self._lanes: dict[int, _Lane] = {}
        self._swept = -math.inf

    def admit(self, tenant: str, job_id: str, tokens: int, now: float, *, contended: bool,
              lane: int = 0) -> Admission:
        """Admit (and count) or refuse one job of ``tenant`` costing ``tokens``, in ``lane``
        of a pool that is ``contended`` or not. Admitting an id already outstanding is a no-op."""
        spec = self.specs.get(tenant)
        if spec is None:
            return ADMITTED
        self._sweep(now)
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(spec, self.share, now)
        if job_id in state.outstanding:  # a redelivery of a job already admitted
            return ADMITTED
        refusal = self._quota(tenant, state, tokens, now)
        if refusal is not None:
            return refusal
        fair = self._lanes.get(lane) or self._lanes.setdefault(lane, _Lane())
        least = fair.least(tenant)
        if least is not None:
            mine = fair.counter.get(tenant, 0.0)
            # Becoming active: lifted to the least-served (VTC's lift: idling banks no credit);
            # staying active with light use: at most CREDIT behind it.
            floor = least[1] if fair.active.get(tenant, 0) == 0 else least[1] - self.credit
            fair.counter[tenant] = mine = max(mine, floor)
            lead = mine - least[1]
            if contended and lead > self.allowance:
                return self._unfair(tenant, spec, least, lead, fair, now)
        state.last = now
        for bucket, cost in ((state.jobs, 1.0), (state.tokens, float(tokens))):
            if bucket is not None:
                bucket.level -= cost
        state.outstanding[job_id] = lane
        fair.active[tenant] = fair.active.get(tenant, 0) + 1
        fair.charge(tenant, tokens / spec.weight, now)
        if len(state.outstanding) > max(MAX_OUTSTANDING, state.concurrent or 0):
            self.finished(tenant, next(iter(state.outstanding)))
        return ADMITTED

    def _quota(self, tenant: str, state: _Tenant, tokens: int, now: float) -> Admission | None:
        spec = state.spec
        if state.concurrent is not None and len(state.outstanding) >= state.concurrent:
            return Admission(admitted=False, reason=f"quota: tenant {tenant} at its {spec.concurrent} concurrent "
                             f"jobs{self._of(state.concurrent)}", retry_after_s=CONCURRENT_RETRY_S)
        if state.jobs is not None and (wait := state.jobs.wait(1.0, now)) > 0:
            return Admission(admitted=False, reason=f"quota: tenant {tenant} over {spec.jobs_per_s:g} jobs/s"
                             f"{self._of(state.jobs.rate)}", retry_after_s=_hint(wait))
        if state.tokens is not None and (wait := state.tokens.wait(float(tokens), now)) > 0:
            return Admission(admitted=False, reason=f"quota: tenant {tenant} over {spec.tokens_per_min:g} "
                             f"tokens/min (this job counts {tokens}){self._of(state.tokens.rate * 60)}",
                             retry_after_s=_hint(wait))
        return None

    def _of(self, limit: float) -> str:
        return "" if self.share == 1 else f" ({limit:g} at this worker's share {self.share:g})"

    def _unfair(self, tenant: str, spec: TenantSpec, least: tuple[str, float], lead: float, fair: _Lane,
                now: float) -> Admission:
        # The least-served tenant closes the gap at its own pace; when it is idle, slots free
        # up and the pool stops being contended soon anyway: the bounds say "soon".
        speed = fair.rate(least[0], now)
        wait = (lead - self.allowance) / speed if speed > 0 else RETRY_BOUNDS_S[1]
        low, high = RETRY_BOUNDS_S
        weight = self.specs[least[0]].weight
        return Admission(admitted=False, retry_after_s=_hint(min(high, max(low, wait))),
                         reason=f"fair share: tenant {tenant} is {lead:.0f} tokens per weight ahead of "
                                f"{least[0]} (weights {spec.weight:g}:{weight:g}) while its pool is full")

    def finished(self, tenant: str, job_id: str) -> bool:
        """Free ``job_id`` of ``tenant`` (its concurrent slot, its lane's activity); False: not outstanding."""
        state = self._tenants.get(tenant)
        if state is None or job_id not in state.outstanding:
            return False
        lane = state.outstanding.pop(job_id)
        fair = self._lanes.get(lane)
        if fair is not None and fair.active.get(tenant, 0) > 0:
            fair.active[tenant] -= 1
        return True

    def outstanding(self, tenant: str) -> list[str]:
        """The ids of ``tenant`` admitted and not yet finished, oldest first."""
        state = self._tenants.get(tenant)
        return [] if state is None else list(state.outstanding)

    def reshare(self, share: float) -> None:
        """Enforce ``share`` of every limit from now on (the number of policy workers changed);
        buckets keep how full they are, in proportion."""
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], not {share}")
        scale, self.share = share / self.share, share
        for state in self._tenants.values():
            for bucket in (state.jobs, state.tokens):
                if bucket is not None:
                    bucket.rate, bucket.depth = bucket.rate * scale, bucket.depth * scale
                    bucket.level *= scale
            if state.spec.concurrent is not None:
                state.concurrent = max(1, math.floor(state.spec.concurrent * share + 1e-9))

    def oldest(self, tenant: str, per_lane: int) -> list[str]:
        """Up to ``per_lane`` of the oldest ids of ``tenant`` still outstanding in each lane: the
        ones most likely finished, for the live shell to check (lanes finish at their own pace)."""
        state = self._tenants.get(tenant)
        # How many each lane gives: the walk stops once every lane has given them, rather than
        # going through a long backlog at every tick.
        left = {lane: min(per_lane, fair.active.get(tenant, 0)) for lane, fair in self._lanes.items()}
        wanted = sum(left.values())
        ids: list[str] = []
        for job_id, lane in state.outstanding.items() if state else ():
            if len(ids) == wanted:
                break
            if left.get(lane, 0) > 0:
                left[lane] -= 1
                ids.append(job_id)
        return ids

    def tenants(self) -> list[str]:
        """The tenants the ledger holds state for now (bounded by the recently active)."""
        return list(self._tenants)

    def _sweep(self, now: float) -> None:
        if now - self._swept < FORGET_S / 4:
            return
        self._swept = now
        idle = [t for t, s in self._tenants.items() if not s.outstanding and now - s.last >= FORGET_S]
        for tenant in idle:
            del self._tenants[tenant]
            for fair in self._lanes.values():
                for table in (fair.counter, fair.active, fair.speed):
                    table.pop(tenant, None)
        for lane in [n for n, fair in self._lanes.items() if not fair.counter]:
            del self._lanes[lane]
