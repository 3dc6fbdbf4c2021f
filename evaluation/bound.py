"""An upper bound on a class's SLO attainment that no routing policy can beat, from the whole trace.

The bound sees every arrival of the run (future ones too), each job's true output length and
the true device times, and asks: how many jobs of the class could meet their targets if the
fleet's capacity could be divided among them at will? It is a linear program (a *fluid
relaxation*), solved exactly by HiGHS through ``scipy`` (the ``report`` extra), and it is
an upper bound because every constraint it keeps holds for any schedule, while the ones it
drops (slots are whole, a job runs on one worker, other classes need capacity too) only
ever make the real optimum lower:

* **Work.** A worker running ``c`` jobs at once gives each ``1/c`` of itself. A job on pool
  ``p`` therefore uses at least ``w = prefill + decode`` worker-seconds: ``prefill`` the least
  ``ttft(prompt, c) / c`` over concurrencies whose prefill fits the TTFT target, ``decode``
  the least cost of its ``n - 1`` tokens when each token may run at any concurrency
  ``c`` (costing ``itl(c) / c``) and their mean ``itl`` must stay within the TPOT target
  (the lower convex envelope of the points ``(itl(c), itl(c) / c)``, ``c`` up to the pool's
  slots). A job no concurrency can serve in time on ``p`` cannot meet there.
* **Windows.** A job meeting its targets does all that work between its arrival ``a`` and
  ``a + ttft + (n - 1) x tpot`` (or ``a + e2e``; with neither, only its prefill, by ``a + ttft``:
  its decode may wait past the run), so for every
  pool and interval ``I`` the work of the jobs whose windows lie inside ``I`` is at most the
  pool's workers times ``|I|``. The intervals are a dyadic family (lengths from a quarter of
  a second to the whole run, each length on a grid of a quarter of itself): every window lies
  inside one at most about twice its length.
* **Slots.** A job meeting its TTFT target has started by ``a + ttft`` and, taking at least its
  idle-device time ``s`` (``ttft(prompt, 1) + (n - 1) x itl(1)``) to run, holds a slot all
  through ``[a + ttft, a + s]``. At every instant, the jobs that must be holding a slot on a
  pool are at most its slots (workers times slots per worker): the scarce accelerator's limit.
* **Choice.** Each job meets on at most one pool: variables ``x[j, p]`` in ``[0, 1]`` with
  ``sum_p x[j, p] <= 1``; the objective is ``sum v[j] x[j, p]``, ``v`` a job's worth: 1 for
  attainment, or its class's weight times its output tokens for a weighted goodput.

The relaxation is of the *fluid* device: each token takes one concurrency's time and share. The
simulator reads a worker's concurrency once per prefill and once per 32-token decode chunk
(``evaluation.pools``), so a job that started before others joined pays a little less than
the fluid model charges; a policy could in principle exploit that by a hair. bench/POLICY.md
checks the bound against every policy's result on every run.

**How tight.** The bound counts only the classes it is asked about and may drop or defer the
rest (a policy could), so a bound on interactive attainment is tight only where interactive
work alone fills the fleet; bounding the weighted goodput of every class counts them all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cache

import msgspec

from evaluation.workloads import Arrival
from policies.classify import classify
from policies.config import PolicyConfig, SLOClass
from policies.profiles import PROFILES, ModelProfile

MIN_INTERVAL_S = 0.25
"""The shortest interval of the family; windows shorter than this are charged to one this long."""


class Bound(msgspec.Struct, frozen=True, kw_only=True):
    """The fluid bound over one trace: on how much of the counted classes' value can meet its targets."""

    jobs: int
    """Jobs of the counted classes in the trace."""
    total: float
    """Their value if every one met its target (``jobs`` when each job is worth 1)."""
    met: float
    """At most this much of it can (the LP optimum)."""
    feasible: int
    """Jobs some pool could serve in time if it were idle: the bound with no capacity limit."""
    share: dict[int, dict[str, float]]
    """The optimum: for each job (its index in the trace) served at all, the share on each pool."""

    @property
    def fraction(self) -> float:
        """``met / total``: with each job worth 1, the bound on the attainment (1.0 with no jobs)."""
        return self.met / self.total if self.total else 1.0


def _lower_envelope(points: Sequence[tuple[float, float]], x: float) -> float:
    """The lower convex envelope of ``points`` at ``x`` (``inf`` left of every point), restricted to
    mixtures whose mean x is at most ``x``: the least mean y of tokens whose mean x fits."""
    best = min((y for px, y in points if px <= x), default=math.inf)
    for ax, ay in points:
        if ax > x:
            continue
        for bx, by in points:
            if bx > x:  # mix a point left of x with one right of it, exactly at x
                t = (x - ax) / (bx - ax)
                best = min(best, ay + t * (by - ay))
    return best


@cache
def _decode_cost(model: ModelProfile, slots: int, tpot_ms: float | None, slowdown: float) -> float:
    """Least worker-milliseconds per decoded token on a worker of ``slots`` slots within ``tpot_ms``."""
    points = [(model.itl(c) * slowdown, model.itl(c) * slowdown / c) for c in range(1, slots + 1)]
    return _lower_envelope(points, math.inf if tpot_ms is None else tpot_ms)


def _prefill_cost(model: ModelProfile, slots: int, prompt: int, ttft_ms: float, slowdown: float) -> float:
    """Least worker-milliseconds of a prefill that fits ``ttft_ms``; ``inf`` when none does."""
    return min((t / c for c in range(1, slots + 1) if (t := model.ttft(prompt, c) * slowdown) <= ttft_ms),
               default=math.inf)


def _work_ms(cls: SLOClass, model: ModelProfile, slots: int, prompt: int, tokens: int,
             slowdown: float) -> tuple[float, float]:
    """Least worker-milliseconds of prefill and of decode for a job to meet ``cls`` on a worker;
    ``inf`` when it cannot."""
    if model.ttft(prompt, 1) * slowdown > cls.ttft_ms:
        return math.inf, math.inf
    if cls.e2e_ms is not None and model.service_ms(prompt, tokens, 1) * slowdown > cls.e2e_ms:
        return math.inf, math.inf
    tpot = cls.tpot_ms if tokens > 1 else None
    return (_prefill_cost(model, slots, prompt, cls.ttft_ms, slowdown),
            _decode_cost(model, slots, tpot, slowdown) * max(0, tokens - 1))


def _intervals(end: float) -> list[tuple[float, float]]:
    """The dyadic interval family over ``[0, end]``: lengths doubling from :data:`MIN_INTERVAL_S`,
    each started on a grid of a quarter of its length, and the whole run."""
    out = [(0.0, end)]
    length = MIN_INTERVAL_S
    while length < end:
        step = length / 4
        out += [(k * step, k * step + length) for k in range(math.ceil(end / step))]
        length *= 2
    return out


def fluid_bound(config: PolicyConfig, arrivals: Sequence[Arrival], fleet: Mapping[str, int], *,
                weights: Mapping[str, float] | None = None, per_token: bool = False,
                slowdown: Mapping[str, float] | None = None) -> Bound:
    """The fluid LP bound (see the module docs) on the jobs in ``arrivals`` that can meet their
    class's targets on ``fleet``, counting the classes in ``weights`` (default: interactive only),
    each job worth its class's weight, times its output tokens with ``per_token``.
    ``slowdown``: each pool's true device time over its profile's."""
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import coo_array

    worth = {"interactive": 1.0} if weights is None else weights
    slow = slowdown or {}
    jobs: list[tuple[int, float, float, dict[str, float]]] = []  # (index, start, end, work per pool)
    value: list[float] = []
    held: dict[str, list[tuple[int, float, float]]] = {}  # pool: (job, from, to) it must hold a slot
    count, total = 0, 0.0
    horizon = max((a.at for a in arrivals), default=0.0)
    for i, arrival in enumerate(arrivals):
        job = arrival.features
        cls = classify(job, config)[0]
        if cls not in worth:
            continue
        target = config.classes[cls]
        tokens = 0 if job.kind == "embedding" else max(1, job.max_tokens)
        count += 1
        v = worth[cls] * (tokens if per_token else 1)
        total += v
        window = min(target.ttft_ms + (tokens - 1) * target.tpot_ms if target.tpot_ms is not None and tokens > 1
                     else math.inf, math.inf if target.e2e_ms is None else target.e2e_ms)
        work: dict[str, float] = {}
        for name in config.serving(job.model, job.kind):
            spec, profile = config.pools[name], PROFILES[config.pools[name].profile]
            model = profile.model(job.model)
            if model is None or fleet.get(name, 0) <= 0:
                continue
            slots = min(spec.concurrency, profile.max_concurrency or spec.concurrency)
            prefill, decode = _work_ms(target, model, slots, job.prompt_tokens, tokens, slow.get(name, 1.0))
            if math.isfinite(prefill + decode):
                # A job with no deadline on its last token may decode any time later: only its
                # prefill is bound to a window (its TTFT's).
                work[name] = (prefill + decode if math.isfinite(window) else prefill) / 1000
                idle_s = model.service_ms(job.prompt_tokens, tokens, 1) * slow.get(name, 1.0) / 1000
                if idle_s > target.ttft_ms / 1000:
                    held.setdefault(name, []).append(
                        (len(jobs), arrival.at + target.ttft_ms / 1000, arrival.at + idle_s))
        if not work:
            continue
        end = arrival.at + (window if math.isfinite(window) else target.ttft_ms) / 1000
        horizon = max(horizon, end)
        jobs.append((i, arrival.at, end, work))
        value.append(v)
    if not jobs:
        return Bound(jobs=count, total=total, met=0.0, feasible=0, share={})

    pools = sorted({p for _, _, _, w in jobs for p in w})
    var: dict[tuple[int, str], int] = {}
    for k, (_, _, _, work) in enumerate(jobs):
        for p in work:
            var[k, p] = len(var)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    rhs: list[float] = []
    for k, (_, _, _, work) in enumerate(jobs):  # each job meets on one pool at most
        for p in work:
            rows.append(len(rhs))
            cols.append(var[k, p])
            vals.append(1.0)
        rhs.append(1.0)
    starts = np.array([s for _, s, _, _ in jobs])
    ends = np.array([e for _, _, e, _ in jobs])
    order = np.argsort(starts)
    for lo, hi in _intervals(horizon):
        # The jobs whose windows lie inside [lo, hi], by a binary search on the sorted starts.
        first = int(np.searchsorted(starts[order], lo, side="left"))
        last = int(np.searchsorted(starts[order], hi, side="right"))
        inside = [int(k) for k in order[first:last] if ends[k] <= hi]
        if not inside:
            continue
        for p in pools:
            members = [k for k in inside if p in jobs[k][3]]
            if not members:
                continue
            capacity = fleet[p] * (hi - lo)
            if sum(jobs[k][3][p] for k in members) <= capacity:
                continue  # cannot bind: leave it out of the LP
            for k in members:
                rows.append(len(rhs))
                cols.append(var[k, p])
                vals.append(jobs[k][3][p])
            rhs.append(capacity)
    for p, spans in held.items():
        slots = fleet[p] * min(config.pools[p].concurrency,
                               PROFILES[config.pools[p].profile].max_concurrency or config.pools[p].concurrency)
        who = np.array([k for k, _, _ in spans])
        opens, closes = np.array([o for _, o, _ in spans]), np.array([c for _, _, c in spans])
        for t in np.unique(opens):  # the most spans overlap at some span's start
            members = who[(opens <= t) & (closes >= t)]
            if len(members) > slots:
                for k in members:
                    rows.append(len(rhs))
                    cols.append(var[int(k), p])
                    vals.append(1.0)
                rhs.append(float(slots))
    matrix = coo_array((vals, (rows, cols)), shape=(len(rhs), len(var))).tocsr()
    objective = -np.array([value[k] for k, _ in var])  # var's insertion order is its column order
    solved = linprog(objective, A_ub=matrix, b_ub=np.array(rhs), bounds=(0.0, 1.0), method="highs")
    if solved.status != 0:
        raise RuntimeError(f"the bound's LP did not solve: {solved.message}")
    share: dict[int, dict[str, float]] = {}
    for (k, p), v in var.items():
        if solved.x[v] > 1e-9:
            share.setdefault(jobs[k][0], {})[p] = float(solved.x[v])
    return Bound(jobs=count, total=total, met=float(-solved.fun), feasible=len(jobs), share=share)
