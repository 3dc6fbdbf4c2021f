"""Routing: pick the pool for a classified job from a snapshot of the pools.

This first policy is static rules plus backlog: a class listed in a pool's
``prefer_for`` goes there while that pool has room (backlog under ``max_backlog``), and
everything else stays on the default pool. It never routes a job to a pool that cannot
serve its model and kind. A predicted TTFT from the pool's device profile rides along
with each decision so misses can be explained later.
"""

from __future__ import annotations

import msgspec

from policies.config import PolicyConfig
from policies.profiles import PROFILES


class JobFeatures(msgspec.Struct, frozen=True, kw_only=True):
    """What the policy knows about a job: no payload, just what decisions need."""

    tenant: str
    model: str
    kind: str
    prompt_tokens: int
    max_tokens: int
    slo_hint: str | None = None


class PoolState(msgspec.Struct, frozen=True, kw_only=True):
    """Live view of one pool, from Redis (backlog) and worker heartbeats."""

    backlog: int = 0
    """Entries routed to the pool and not yet acked (unread plus in progress), every lane."""
    queued: tuple[int, ...] = ()
    """Of those, the entries no worker has taken yet, by priority lane (``PolicyConfig.lane``),
    most urgent first; the rest of ``backlog`` is running. Empty: not known by lane."""
    workers: int = 0
    """Workers that sent a heartbeat recently."""
    in_flight: int = 0
    capacity: int = 0
    """Jobs the live workers can run at once."""
    cooling_until: float | None = None
    """While every live worker's backend is cooling down (its endpoints answered 429 or 5xx):
    when the first is usable again. ``None``: some worker can take a job now."""

    def ahead(self, lane: int | None) -> int:
        """Jobs a new job of ``lane`` would wait behind: all running work plus what is queued
        in its own and more urgent lanes. Workers fill free slots from lane 0 first, so queued
        work of less urgent lanes is overtaken. ``None``, or no counts by lane: the whole backlog."""
        if lane is None or not self.queued:
            return self.backlog
        waiting = sum(self.queued)
        return max(0, self.backlog - waiting) + sum(self.queued[: lane + 1])

    def routed(self, lane: int, n: int = 1) -> PoolState:
        """This state with ``n`` more jobs queued on ``lane`` (a router counting its own moves)."""
        queued = self.queued
        if queued:
            queued = queued + (0,) * (lane + 1 - len(queued))
            queued = (*queued[:lane], queued[lane] + n, *queued[lane + 1:])
        return msgspec.structs.replace(self, backlog=self.backlog + n, queued=queued)

    def cooling(self, now: float) -> bool:
        """Whether the pool can take no job before ``cooling_until``."""
        return self.cooling_until is not None and self.cooling_until > now


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """All pools at one instant. ``now`` is seconds since the epoch, passed in."""

    now: float
    pools: dict[str, PoolState] = {}


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """Where a job goes and why.

    ``pool`` is ``None`` when no pool can serve the job, or when it is shed (``shed``):
    its class may not run best-effort and no pool is predicted to meet its target.
    """

    pool: str | None
    reason: str
    predicted_ttft_ms: float | None = None
    predicted_e2e_ms: float | None = None
    shed: bool = False
    retry_after_s: float | None = None
    """Shed jobs: when sending it again may be worth it (see :func:`policies.slo.retry_after_s`)."""


def _predicted_ttft(config: PolicyConfig, pool: str, job: JobFeatures, state: PoolState,
                    lane: int | None) -> float | None:
    spec = config.pools[pool]
    model = PROFILES[spec.profile].model(job.model)
    if model is None:
        return None
    workers = max(1, state.workers)
    concurrency = min(spec.concurrency, 1 + state.backlog // workers)
    # Jobs beyond what the workers run at once wait for a slot: roughly one service time per
    # wave of ``capacity`` jobs ahead of this one (on its lane, see PoolState.ahead).
    capacity = max(1, state.capacity or spec.concurrency * workers)
    waves = max(0, state.ahead(lane) - capacity) / capacity
    service = model.service_ms(job.prompt_tokens, job.max_tokens, concurrency)
    return model.ttft(job.prompt_tokens, concurrency) + waves * service


def route(job: JobFeatures, slo: str, config: PolicyConfig, snapshot: Snapshot) -> Decision:
    """Choose a pool for ``job`` of class ``slo``.

    Deterministic for a given job, config and snapshot.
    """
    serving = config.serving(job.model, job.kind)
    if not serving:
        return Decision(pool=None, reason=f"no pool serves {job.kind} on model {job.model!r}")
    lane = config.lane(slo) if slo in config.classes else None
    notes: list[str] = []
    for name in serving:
        spec = config.pools[name]
        if slo not in spec.prefer_for:
            continue
        state = snapshot.pools.get(name, PoolState())
        if state.backlog < spec.max_backlog:
            reason = f"{slo} prefers {name}; backlog {state.backlog} < {spec.max_backlog}"
            return Decision(pool=name, reason=reason, predicted_ttft_ms=_predicted_ttft(config, name, job, state, lane))
        notes.append(f"{name} backlog {state.backlog} >= {spec.max_backlog}")
    preferring = [n for n, p in config.pools.items() if slo in p.prefer_for and n not in serving]
    notes += [f"{n} does not serve {job.kind} on {job.model}" for n in preferring]
    target = serving[0]
    reason = "; ".join(notes + [f"{target} (default)" if target == config.default_pool else target])
    state = snapshot.pools.get(target, PoolState())
    return Decision(pool=target, reason=reason, predicted_ttft_ms=_predicted_ttft(config, target, job, state, lane))
