"""Regenerate ``bench/POLICY.md`` and its plots: every routing policy in the simulator.

Run from the repository root (needs matplotlib, the ``report`` extra)::

    python -m bench.policy_report            # the full report, a few minutes on 2 cores
    python -m bench.policy_report --quick    # short runs, to check the script

Everything simulated is deterministic (seeded); only the timings in the header change
between runs. The numbers come from :mod:`evaluation.simulator` and :mod:`evaluation.workloads`;
this script only sweeps, tabulates and plots.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import msgspec

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: python bench/policy_report.py
    sys.path.insert(0, str(HERE.parent))

from bench.misbelief import FLEET, misbelief_section  # noqa: E402
from broker.config import load_config  # noqa: E402
from evaluation.baselines import ROUTERS  # noqa: E402
from evaluation.bound import fluid_bound  # noqa: E402
from evaluation.goodput import MULTIPLIERS, Goodput, goodput  # noqa: E402
from evaluation.metrics import ClassMetrics, attainment, summarize  # noqa: E402
from evaluation.options import SimOptions  # noqa: E402
from evaluation.records import SimResult  # noqa: E402
from evaluation.simulator import simulate  # noqa: E402
from evaluation.workloads import WORKLOADS, Arrival, Bursty, Diurnal, Poisson, Ramp, generate  # noqa: E402
from policies.classify import classify  # noqa: E402
from policies.config import PolicyConfig  # noqa: E402
from policies.profiles import PROFILES  # noqa: E402

SEED = 1
WORKLOAD_NAMES = ("chat", "code", "mixed", "diurnal", "rag", "ramp")
POLICIES = tuple(ROUTERS)
REFERENCE = ("slo", "oracle")
BASELINES = tuple(n for n in POLICIES if n not in REFERENCE)
BEST_EFFORT = "slo best-effort"
"""The slo router with admission off (every class ``on_unattainable = "best_effort"``)."""
LABELS = (POLICIES[0], BEST_EFFORT, *POLICIES[1:])
"""Every policy run at the load points: the policies of ``ROUTERS`` and the best-effort variant."""
LOAD_POINTS = (("low", 0.5), ("knee", 1.0), ("1.3x", 1.3), ("1.5x", 1.5))
"""Loads as multiples of each workload's knee (:func:`knee_multiplier`)."""
DETAIL = "1.5x"
WEIGHTS = {"interactive": 4.0, "standard": 2.0, "batch": 1.0}
"""All-class goodput: a met output token of each class is worth this much (others: 1)."""
GPU_GRID = (1, 2, 4, 6, 8)
ACCEL_GRID = (0, 1, 2, 4)
ACCEL_ONLY_GRID = (1, 2, 3, 4, 6, 8, 10, 12)
OPTIONS = SimOptions()
FLOOR = 0.5
"""Attainment-vs-load curves stop after the first point below this."""
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    duration: float
    fleets_gpu: tuple[int, ...]
    fleets_accel: tuple[int, ...]
    refine: int


FULL = Settings(duration=60.0, fleets_gpu=GPU_GRID, fleets_accel=ACCEL_GRID, refine=3)
QUICK = Settings(duration=15.0, fleets_gpu=(2, 4), fleets_accel=(0, 1, 2), refine=1)


@cache
def config() -> PolicyConfig:
    return load_config()


# --------------------------------------------------------------------------- tasks (run in worker processes)


def best_effort_config() -> PolicyConfig:
    """The default policy with admission off: every class ``on_unattainable = "best_effort"``."""
    cfg = config()
    return msgspec.structs.replace(cfg, classes={
        name: msgspec.structs.replace(cls, on_unattainable="best_effort") for name, cls in cfg.classes.items()})


def variant(label: str) -> tuple[str, PolicyConfig]:
    """The router name and the config of a label of :data:`LABELS`."""
    return ("slo", best_effort_config()) if label == BEST_EFFORT else (label, config())


def sweep_task(args: tuple[str, str, float, int]) -> tuple[str, str, Goodput]:
    """Interactive goodput of one policy on one workload, with the attainment-vs-load points."""
    workload, policy, duration, refine = args
    cfg = config()
    g = goodput(cfg, lambda: ROUTERS[policy](cfg), WORKLOADS[workload], FLEET, SEED, duration,
                refine=refine, floor=FLOOR, options=OPTIONS)
    return workload, policy, g


class AllClassGoodput(msgspec.Struct, frozen=True):
    tokens_per_s: float
    """Output tokens of jobs that met their class's targets, weighted by :data:`WEIGHTS`, per second of arrivals."""
    cost_per_mtok: float | None
    """Provisioned fleet cost of the run per 1M met output tokens (unweighted); None: none met."""


def all_class_goodput(result: SimResult, cfg: PolicyConfig) -> AllClassGoodput:
    met = [r for r in result.records if r.slo_met]
    weighted = sum(WEIGHTS.get(r.cls, 1.0) * r.output_tokens for r in met)
    tokens = sum(r.output_tokens for r in met)
    cost = sum(u.workers * u.cost_per_hour for u in result.usage.values()) * result.end / 3600
    return AllClassGoodput(weighted / result.duration, cost / tokens * 1e6 if tokens else None)


@dataclass(frozen=True)
class LoadRun:
    workload: str
    label: str
    point: str
    multiplier: float
    classes: dict[str, ClassMetrics]
    goodput: AllClassGoodput
    ttft_ms: list[float]
    """Interactive jobs' TTFT; jobs not served count as infinite."""
    seconds: float


def load_task(args: tuple[str, str, str, float, float]) -> LoadRun:
    """Every class's metrics for one policy at one load, and the interactive TTFTs for CDFs."""
    workload, label, point, multiplier, duration = args
    policy, cfg = variant(label)
    started = time.perf_counter()
    result = simulate(cfg, ROUTERS[policy](cfg), WORKLOADS[workload].scaled(multiplier), FLEET, SEED, duration,
                      options=OPTIONS)
    seconds = time.perf_counter() - started
    inter = [r for r in result.records if r.cls == "interactive"]
    return LoadRun(workload, label, point, multiplier, summarize(result, cfg), all_class_goodput(result, cfg),
                   [r.ttft_ms if r.ttft_ms is not None and r.status == "ok" else math.inf for r in inter], seconds)


@dataclass(frozen=True)
class BoundRun:
    workload: str
    point: str
    interactive: float
    """The fluid upper bound on interactive attainment."""
    tokens_per_s: float
    """... and on all-class goodput (weighted met tokens per second of arrivals)."""


def bound_task(args: tuple[str, str, float, float]) -> BoundRun:
    """The fluid upper bounds (``evaluation.bound``) for one workload at one load."""
    workload, point, multiplier, duration = args
    trace = generate(WORKLOADS[workload].scaled(multiplier), SEED, duration)
    goodput = fluid_bound(config(), trace, FLEET, weights=WEIGHTS, per_token=True)
    return BoundRun(workload, point, fluid_bound(config(), trace, FLEET).fraction, goodput.met / duration)


def split_by_model(cfg: PolicyConfig, fleet: dict[str, int]) -> tuple[PolicyConfig, dict[str, int], str]:
    """``fleet`` with half the workers of each pool whose models cannot all meet the interactive
    TPOT at the pool's full slots moved to a pool of their own that runs only those models, at
    the most jobs per worker at which every one of them still meets it; and what was split."""
    tpot = cfg.classes["interactive"].tpot_ms
    pools, out, said = dict(cfg.pools), dict(fleet), []
    for name, spec in cfg.pools.items() if tpot is not None else ():
        profile = PROFILES[spec.profile]
        slots = min(spec.concurrency, profile.max_concurrency or spec.concurrency)
        slow = {m: model for m in spec.models if (model := profile.model(m)) is not None and model.itl(slots) > tpot}
        cap = min((max((c for c in range(1, slots + 1) if model.itl(c) <= tpot), default=0)
                   for model in slow.values()), default=0)
        if not cap or fleet.get(name, 0) < 2:
            continue
        apart = f"{name}-{'+'.join(slow)}"
        pools[name] = msgspec.structs.replace(spec, models=tuple(m for m in spec.models if m not in slow))
        pools[apart] = msgspec.structs.replace(spec, models=tuple(slow), concurrency=cap, prefer_for=())
        out[apart] = fleet[name] // 2
        out[name] = fleet[name] - out[apart]
        itl = ", ".join(f"{m} {model.itl(cap):.1f} ms there, {model.itl(slots):.1f} ms at {slots}"
                        for m, model in slow.items())
        said.append(f"{out[apart]} of the {fleet[name]} {name} workers run only {', '.join(slow)}, at most "
                    f"{cap} jobs each: the most at which its time per token meets the interactive {tpot:g} ms "
                    f"({itl})")
    return msgspec.structs.replace(cfg, pools=pools), out, "; ".join(said)


@dataclass(frozen=True)
class GapRun:
    workload: str
    slo: float
    """slo's interactive attainment at the knee, every class in the trace."""
    alone: float
    """... on the trace's interactive jobs alone (what the bound may do: leave the other classes out)."""
    split: float
    """... on them alone, on the fleet of :func:`split_by_model`."""
    misses: dict[str, int]
    """slo's interactive misses at the knee by model (shed, late or failed)."""


def gap_task(args: tuple[str, float, float]) -> GapRun:
    """Where slo's gap to the interactive bound at the knee is: the same trace with the other
    classes left out, and then with the GPU workers split by model."""
    workload, multiplier, duration = args
    cfg = config()
    trace = generate(WORKLOADS[workload].scaled(multiplier), SEED, duration)
    alone = [a for a in trace if classify(a.features, cfg)[0] == "interactive"]
    split_cfg, split_fleet, _ = split_by_model(cfg, FLEET)

    def run(c: PolicyConfig, arrivals: list[Arrival], fleet: dict[str, int]) -> SimResult:
        return simulate(c, ROUTERS["slo"](c), arrivals, fleet, SEED, duration, options=OPTIONS)

    full = run(cfg, trace, FLEET)
    misses = Counter(r.model for r in full.records if r.cls == "interactive" and not r.slo_met)
    return GapRun(workload, attainment(full, "interactive"), attainment(run(cfg, alone, FLEET), "interactive"),
                  attainment(run(split_cfg, alone, split_fleet), "interactive"), misses)


@dataclass(frozen=True)
class FleetRun:
    workload: str
    policy: str
    gpu: int
    accel: int
    multiplier: float
    per_hour: float
    cost_per_mtok: float | None
    interactive: float
    overall: float


def fleet_task(args: tuple[str, str, int, int, float, float]) -> FleetRun:
    """One policy on one fleet at one load: cost and interactive attainment."""
    workload, policy, gpu, accel, multiplier, duration = args
    cfg = config()
    fleet = {"gpu": gpu, "accel": accel}
    result = simulate(cfg, ROUTERS[policy](cfg), WORKLOADS[workload].scaled(multiplier), fleet, SEED, duration,
                      options=OPTIONS)
    table = summarize(result, cfg)
    per_hour = sum(n * cfg.pools[p].cost_per_hour for p, n in fleet.items())
    inter = table.get("interactive")
    return FleetRun(workload, policy, gpu, accel, multiplier, per_hour, table["all"].cost_per_mtok,
                    inter.attainment if inter else 1.0, table["all"].attainment)


COST_POLICIES = tuple(p for p in POLICIES if p != "oracle")
COST_POINT = "1.3x"
"""The oracle's look-ahead makes overloaded fleets slow, and its costs track the SLO router's."""


def fleets_for(policy: str, s: Settings) -> list[tuple[int, int]]:
    """The same grid for every policy; accelerator-only also on fleets without GPUs."""
    fleets = [(g, a) for g in s.fleets_gpu for a in s.fleets_accel]
    if policy == "accel_only":
        fleets += [(0, a) for a in ACCEL_ONLY_GRID]
    return sorted(set(fleets))


def parallel(fn: Callable[[Any], T], tasks: Iterable[Any], jobs: int) -> list[T]:
    tasks = list(tasks)
    if jobs <= 1:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(fn, tasks, chunksize=1))


# --------------------------------------------------------------------------- analysis


def knee_multiplier(sweeps: dict[str, Goodput]) -> float:
    """The knee: the highest load at which any policy still meets the interactive target (its
    goodput), or the lowest grid load if none does."""
    return max((g.multiplier for g in sweeps.values()), default=0.0) or MULTIPLIERS[0]


def cheapest(runs: Sequence[FleetRun], target: float) -> FleetRun | None:
    """The cheapest fleet (per hour, then per token) meeting the interactive target."""
    ok = [r for r in runs if r.interactive >= target]
    return min(ok, key=lambda r: (r.per_hour, r.cost_per_mtok or math.inf)) if ok else None


def frontier(runs: Sequence[FleetRun]) -> list[FleetRun]:
    """Pareto front: the best interactive attainment at each cost per token or less."""
    front: list[FleetRun] = []
    for r in sorted(runs, key=lambda r: (r.cost_per_mtok or math.inf, -r.interactive)):
        if r.cost_per_mtok is not None and (not front or r.interactive > front[-1].interactive):
            front.append(r)
    return front


# --------------------------------------------------------------------------- plots


STYLE = {"slo": dict(color="black", lw=2.4), "oracle": dict(color="black", lw=1.2, ls="--"),
         BEST_EFFORT: dict(color="black", lw=1.6, ls=":")}


def _style(policy: str, i: int) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    return STYLE.get(policy, dict(color=plt.get_cmap("tab10")(i % 10), lw=1.3))


def plot_attainment(sweeps: dict[str, dict[str, Goodput]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5), sharey=True)
    for ax, wl in zip(axes.flat, WORKLOAD_NAMES, strict=True):
        for i, policy in enumerate(POLICIES):
            g = sweeps[wl][policy]
            ax.plot([p.rate for p in g.points], [p.attainment for p in g.points], marker="o", ms=3,
                    label=policy, **_style(policy, i))
        ax.axhline(config().classes["interactive"].attainment, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{wl} ({WORKLOADS[wl].arrivals.__class__.__name__.lower()} arrivals)")
        ax.set_xlabel("arrival rate (jobs/s)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("interactive SLO attainment")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Interactive SLO attainment vs load, fleet gpu={FLEET['gpu']} accel={FLEET['accel']} "
                 f"(dotted: target)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def plot_cost(fleets: dict[str, dict[str, list[FleetRun]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5), sharey=True)
    for ax, wl in zip(axes.flat, WORKLOAD_NAMES, strict=True):
        for i, policy in enumerate(POLICIES):
            if policy not in fleets[wl]:
                continue
            runs = fleets[wl][policy]
            style = _style(policy, i)
            pts = [r for r in runs if r.cost_per_mtok is not None]
            ax.scatter([r.cost_per_mtok or 0 for r in pts], [r.interactive for r in pts], s=8, alpha=0.35,
                       color=style["color"])
            front = frontier(runs)
            ax.step([r.cost_per_mtok or 0 for r in front], [r.interactive for r in front], where="post",
                    label=policy, **style)
        ax.axhline(config().classes["interactive"].attainment, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        rate = WORKLOADS[wl].rate * fleets[wl]["slo"][0].multiplier
        ax.set_title(f"{wl} at {rate:.0f} jobs/s ({COST_POINT} the knee)")
        ax.set_xlabel("provisioned cost per 1M output tokens ($, log)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, which="both")
    for ax in axes[:, 0]:
        ax.set_ylabel("interactive SLO attainment")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Cost vs interactive attainment over fleet sizes (dots: fleets; lines: best attainment "
                 "at that cost or less)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def plot_cdf(loads: dict[str, dict[tuple[str, str], LoadRun]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5), sharey=True)
    target = config().classes["interactive"]
    for ax, wl in zip(axes.flat, WORKLOAD_NAMES, strict=True):
        for i, label in enumerate(LABELS):
            run = loads[wl][label, DETAIL]
            values = sorted(run.ttft_ms)
            n = len(values)
            finite = [v for v in values if math.isfinite(v)]
            ax.plot([max(v, 1.0) for v in finite], [(k + 1) / n for k in range(len(finite))], label=label,
                    **_style(label, i))
        ax.axvline(target.ttft_ms, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        run = loads[wl][LABELS[0], DETAIL]
        ax.set_title(f"{wl} at {WORKLOADS[wl].rate * run.multiplier:.0f} jobs/s ({DETAIL} the knee)")
        ax.set_xlabel("TTFT (ms, log)")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of interactive jobs served by then")
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Interactive TTFT CDFs at {DETAIL} the knee (shed and failed jobs never arrive: the curve "
                 "tops out below 1; dotted: TTFT target)")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


# --------------------------------------------------------------------------- markdown


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms"


def _usd(v: float | None) -> str:
    return "-" if v is None else f"${v:.2f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def setup_section(s: Settings) -> list[str]:
    cfg = config()
    lines = ["## Setup", ""]
    lines += ["Device profiles (`policies/profiles.py`, published figures: NVIDIA NIM benchmarks for H100, "
              "Cerebras/Groq per-user speeds for the accelerator; linear between points):", ""]
    rows = []
    for name in ("h100", "accel"):
        prof = PROFILES[name]
        for model, m in prof.models.items():
            if model == "minilm-l6":
                continue
            rows.append([name, model, ", ".join(f"c={c:g}: {v:g} ms" for c, v in m.ttft_ms),
                         ", ".join(f"c={c:g}: {v:.2f} ms" for c, v in m.itl_ms), f"{m.ref_prompt_tokens}",
                         str(prof.max_concurrency or "-")])
    lines += _table(["device", "model", "TTFT at ref. prompt", "ITL", "ref. prompt", "hard cap"], rows)
    lines += ["Pools and classes: the built-in `broker/default.toml`.", ""]
    lines += _table(["pool", "profile", "slots per worker", "$/h per worker", "prefer_for"],
                    [[n, p.profile, str(p.concurrency), f"${p.cost_per_hour:g}", ", ".join(p.prefer_for) or "-"]
                     for n, p in cfg.pools.items()])
    lines += _table(["class", "TTFT target", "TPOT target", "attainment target", "priority", "if unattainable"],
                    [[n, _ms(c.ttft_ms), _ms(c.tpot_ms), f"{c.attainment:.0%}", str(c.priority), c.on_unattainable]
                     for n, c in cfg.classes.items()])
    fleet_cost = sum(n * cfg.pools[p].cost_per_hour for p, n in FLEET.items())
    lines += [f"Fleet for the load sweeps: **gpu={FLEET['gpu']}, accel={FLEET['accel']}** "
              f"(${fleet_cost:g}/h). One seed ({SEED}), {s.duration:g} s of arrivals per run; jobs then "
              "run to completion.", ""]
    lines += ["Workloads (`evaluation/workloads.py`): token counts are lognormal fits to published percentiles "
              "(mu = ln p50, sigma = ln(pX/p50)/z_X):", ""]
    rows = []
    for name in WORKLOAD_NAMES:
        w = WORKLOADS[name]
        arr = w.arrivals
        if isinstance(arr, Bursty):
            how = f"hyperexponential, CV {arr.cv:g}"
        elif isinstance(arr, Diurnal):
            how = f"Poisson x (1 - {arr.amplitude:g} cos 2 pi t/T), T = run"
        elif isinstance(arr, Ramp):
            how = f"Poisson, rate rising {arr.start:g}x to {arr.end:g}x over the run"
        else:
            assert isinstance(arr, Poisson)
            how = "Poisson"
        rows.append([name, f"{w.rate:g}", how, w.description])
    lines += _table(["workload", "base rate (jobs/s)", "arrivals", "mix"], rows)
    from evaluation.workloads import CODE, CONVERSATION, RETRIEVAL

    rows = []
    for shape in (CONVERSATION, CODE, RETRIEVAL):
        for part, d in (("input", shape.prompt), ("output", shape.output)):
            rows.append([shape.name, part, f"{d.mu:.3f}", f"{d.sigma:.3f}", f"{d.quantile(0.5):,.0f}",
                         f"{d.quantile(0.9):,.0f}", f"{d.quantile(0.99):,.0f}"])
    lines += _table(["trace shape", "tokens", "mu", "sigma", "p50", "p90", "p99"], rows)
    lines += [
        "Conversation fitted on p50/p90 (1,020/2,700 in, 130/420 out); code on p50/p99 of the released "
        "2023 CSV (1,470/7,436 in, 13/249 out; its means 2,048 and 28 against the fit's ~1,870 and ~29); "
        "retrieval is our own design on p50/p90 (3,000/9,000 in, 150/500 out), with no public trace behind it. "
        "Every job's `max_tokens` is its output length, as the live simulated backend produces exactly "
        "`max_tokens`.", "",
        "Definitions:", "",
        "- **SLO attainment**: share of *all* the class's jobs (shed and failed ones count as misses) whose "
        "TTFT from submission, time per output token and end-to-end time all met the class targets. "
        "*Met of admitted*: the same share over the jobs not shed. *Shed*: jobs the router refused at "
        "once because no pool could serve them in time (`slo` admission, for classes with "
        "`on_unattainable = \"shed\"`: docs/configuration.md); *failed*: failed or unfinished.",
        "- **Goodput**: the highest arrival rate (grid of multipliers of the base rate, then 3 bisection "
        "steps) at which the interactive class still meets its attainment target; the grid stops at the "
        "first miss. The *knee* of a workload is the highest goodput of any policy.",
        "- **All-class goodput**: output tokens of the jobs that met their class's targets, per second of "
        f"arrivals, weighted by class ({', '.join(f'{c} {w:g}' for c, w in WEIGHTS.items())}): a batch job "
        "that meets its deadline counts, a late interactive answer does not. Its cost: the "
        "provisioned fleet for the whole run per 1M met output tokens.",
        "- **Cost per 1M output tokens**: the *provisioned* fleet (every worker, busy or idle, at its pool's "
        "$/h, for the whole run) divided by the output tokens served. Per class, each pool's cost is split "
        "by the classes' busy share of it (each job pays its worker's $/h divided by the jobs in flight, "
        "integrated over its life). *Busy* cost counts only worker-time with jobs in flight.",
        "- **Accel share**: share of served jobs that ran on a pool whose device has a hard cap.",
        "- **oracle** (a lookahead heuristic, *not* a bound): the SLO router's rules fed the truth: for the "
        "job being decided and each pool, the simulator copies the pool and runs it forward (no future "
        "arrivals), giving the job's real queue wait, TTFT and time per token there. It knows the present "
        "exactly, not the future, so in overload it can do worse than the SLO router.",
        "- **upper bound**: `evaluation/bound.py`, a linear program over the whole trace (future arrivals, true "
        "output lengths and device times) that no policy can beat: the most interactive jobs (or, for "
        "all-class goodput, the most weighted output tokens of every class) that could meet their targets "
        "if each pool's worker-time and slots could be divided among the jobs' windows at will (a fluid "
        "relaxation, solved exactly by HiGHS). The interactive bound may leave the other classes' work out "
        "(a policy could shed it), so it is loose wherever interactive work alone does not fill the fleet. "
        "Either way a gap to the bound is room a policy *might* find, not room shown to exist (where it is: "
        "the section *Where the gap to the upper bound is*). It relaxes "
        "the fluid device; the simulator's 32-token decode chunks read concurrency at their start, a "
        "difference no run here came near.",
        "",
    ]
    return lines


def goodput_section(sweeps: dict[str, dict[str, Goodput]]) -> list[str]:
    lines = [f"## Interactive goodput on gpu={FLEET['gpu']}, accel={FLEET['accel']}", ""]
    header = ["policy", *WORKLOAD_NAMES]
    rows = []
    for policy in POLICIES:
        cells = [policy]
        for wl in WORKLOAD_NAMES:
            g = sweeps[wl][policy]
            best_base = max(sweeps[wl][p].rate for p in BASELINES)
            text = f"{g.rate:.1f}{'+' if g.capped else ''}"
            if policy not in REFERENCE and g.rate == best_base:
                text = f"**{text}**"
            cells.append(text)
        rows.append(cells)
    ratio = ["slo / best baseline"]
    for wl in WORKLOAD_NAMES:
        best = max(sweeps[wl][p].rate for p in BASELINES)
        ratio.append(f"{sweeps[wl]['slo'].rate / best:.2f}x" if best > 0 else "-")
    rows.append(ratio)
    lines += ["Jobs/s of the whole workload at which the interactive class still meets its target "
              "(bold: best baseline; `+`: still met at the highest rate tried).", ""]
    lines += _table(header, rows)
    lines += ["![attainment vs load](policy_attainment_vs_load.png)", ""]
    return lines


Loads = dict[str, dict[tuple[str, str], LoadRun]]
"""Workload: (label, load point): the run."""
Bounds = dict[str, dict[str, BoundRun]]
"""Workload: load point: the fluid bounds."""


def _attained(m: ClassMetrics) -> str:
    text = f"{m.attainment:.1%}"
    return f"{text} ({m.admitted_attainment:.1%} of admitted, {m.rejected} shed)" if m.rejected else text


def loads_section(loads: Loads, bounds: Bounds) -> list[str]:
    lines = ["## Every policy from low load to 1.5x the knee", "",
             "Each workload at four loads, as multiples of its *knee*: the highest rate at which any policy "
             "still meets the interactive target (the goodput sweep above). For each: interactive SLO "
             "attainment over all its jobs (shed ones count as misses; with shedding, the share met of the "
             "admitted and the jobs shed), then the all-class goodput (met output tokens per second, "
             f"weighted {', '.join(f'{c} {w:g}' for c, w in WEIGHTS.items())}) and the provisioned cost per "
             "1M met tokens. *upper bound*: the fluid LP bound (definitions above): no policy can do better.",
             ""]
    for wl in WORKLOAD_NAMES:
        runs = loads[wl]
        mults = {p: runs[LABELS[0], p].multiplier for p, _ in LOAD_POINTS}
        header = ["policy", *(f"{p} ({WORKLOADS[wl].rate * mults[p]:.0f}/s)" for p, _ in LOAD_POINTS)]
        lines += [f"### {wl}", "", "Interactive SLO attainment:", ""]
        rows = [[label, *(_attained(runs[label, p].classes["interactive"]) for p, _ in LOAD_POINTS)]
                for label in LABELS]
        rows.append(["*upper bound*", *(f"{bounds[wl][p].interactive:.1%}" for p, _ in LOAD_POINTS)])
        lines += _table(header, rows)
        lines += ["All-class goodput (weighted met tokens/s; $ per 1M met tokens):", ""]
        rows = [[label, *(f"{runs[label, p].goodput.tokens_per_s:,.0f}; {_usd(runs[label, p].goodput.cost_per_mtok)}"
                          for p, _ in LOAD_POINTS)] for label in LABELS]
        rows.append(["*upper bound*", *(f"{bounds[wl][p].tokens_per_s:,.0f}" for p, _ in LOAD_POINTS)])
        lines += _table(header, rows)
    return lines


Gaps = dict[str, GapRun]
"""Workload: where slo's gap to the interactive bound at the knee is."""


def gap_section(gaps: Gaps, loads: Loads, bounds: Bounds) -> list[str]:
    _, _, split = split_by_model(config(), FLEET)
    heavy = max({m for g in gaps.values() for m in g.misses}, key=lambda m: sum(g.misses.get(m, 0)
                                                                                for g in gaps.values()))
    lines = ["## Where the gap to the upper bound is", "",
             "At the knee slo sits some points under the interactive bound. The bound reaches higher in two "
             "ways a router cannot: it may leave the other classes' work out (a policy could shed it all), and "
             "it lets every job run at the concurrency that suits it, while a worker runs all its jobs at one. "
             "The columns take these away one at a time, on the same trace at the knee: slo on the whole trace; "
             "on its interactive jobs alone; and on them alone on the fleet with its workers split by model "
             f"({split}), which gives each model the concurrency the bound lets it choose. Which classes to "
             "serve and which worker runs which model are decided above the router (the class config and the "
             "pools).", ""]
    rows = []
    for wl in WORKLOAD_NAMES:
        g, knee = gaps[wl], loads[wl]["slo", "knee"]
        missed = sum(g.misses.values())
        rows.append([wl, f"{WORKLOADS[wl].rate * knee.multiplier:.0f}", f"{g.slo:.1%}", f"{g.alone:.1%}",
                     f"{g.split:.1%}", f"{bounds[wl]['knee'].interactive:.1%}",
                     f"{g.misses.get(heavy, 0) / missed:.0%}" if missed else "-"])
    lines += _table(["workload", "knee (jobs/s)", "slo", "interactive alone", "alone, split by model",
                     "upper bound", f"misses on {heavy}"], rows)
    return lines


def detail_section(loads: Loads) -> list[str]:
    lines = [f"## Per class at {DETAIL} the knee", "",
             "The admitting `slo` router, the same with admission off, the lookahead oracle, the static rule "
             "and the best other baseline (by interactive attainment there). Latencies p50 / p99 from "
             "submission over the jobs served.", ""]
    for wl in WORKLOAD_NAMES:
        runs = loads[wl]
        others = [p for p in BASELINES if p != "static"]
        best = max(others, key=lambda p: runs[p, DETAIL].classes["interactive"].attainment)
        shown = ("slo", BEST_EFFORT, "oracle", "static", best)
        mult = runs[LABELS[0], DETAIL].multiplier
        lines += [f"### {wl} at {WORKLOADS[wl].rate * mult:.1f} jobs/s", ""]
        rows = []
        for label in shown:
            classes = runs[label, DETAIL].classes
            for cls, m in classes.items():
                met, admitted = f"{m.attainment:.1%}", f"{m.admitted_attainment:.1%}"
                if m.target is not None and m.attainment >= m.target:
                    met = f"**{met}**"
                if m.target is not None and m.admitted_attainment >= m.target:
                    admitted = f"**{admitted}**"
                rows.append([label if cls == next(iter(classes)) else "", cls, str(m.jobs), met, admitted,
                             str(m.rejected), str(m.failed), f"{_ms(m.ttft_p50_ms)} / {_ms(m.ttft_p99_ms)}",
                             _usd(m.cost_per_mtok), f"{m.accel_share:.0%}"])
        lines += _table(["policy", "class", "jobs", "SLO met", "met of admitted", "shed", "failed",
                         "TTFT p50 / p99", "$/1M tok", "accel share"], rows)
    lines += ["![latency CDFs](policy_latency_cdf.png)", ""]
    return lines


def cost_section(fleets: dict[str, dict[str, list[FleetRun]]], s: Settings) -> list[str]:
    target = config().classes["interactive"].attainment
    lines = [f"## Cost to meet the interactive target at {COST_POINT} the knee", "",
             f"Each policy at {COST_POINT} each workload's knee (the rates of the tables above) on fleets of "
             f"{', '.join(map(str, s.fleets_gpu))} GPU "
             f"workers x {', '.join(map(str, s.fleets_accel))} accelerators (accelerator-only also on "
             f"{', '.join(map(str, ACCEL_ONLY_GRID))} accelerators without GPUs): the cheapest fleet whose "
             f"interactive attainment reaches {target:.0%}, and its provisioned cost per 1M output tokens. "
             "(The oracle is left out: its lookahead is slow on overloaded fleets.) A router that sends "
             "jobs to a pool with no workers strands them: they count as misses.", ""]
    rows = []
    for policy in COST_POLICIES:
        cells = [policy]
        for wl in WORKLOAD_NAMES:
            best = cheapest(fleets[wl][policy], target)
            cells.append("none" if best is None else
                         f"{best.gpu}+{best.accel}: ${best.per_hour:g}/h, {_usd(best.cost_per_mtok)}/1M "
                         f"({best.interactive:.1%})")
        rows.append(cells)
    rates = {wl: WORKLOADS[wl].rate * fleets[wl]["slo"][0].multiplier for wl in WORKLOAD_NAMES}
    lines += _table(["policy", *(f"{wl} ({rates[wl]:.0f}/s)" for wl in WORKLOAD_NAMES)], rows)
    lines += ["Cells: GPU workers + accelerators, fleet cost per hour, cost per 1M output tokens (interactive "
              "attainment).", "", "![cost vs attainment](policy_cost_vs_attainment.png)", ""]
    return lines


def behind(runs: dict[tuple[str, str], LoadRun]) -> list[str]:
    """Where slo is below a baseline, on interactive attainment or all-class goodput, at any load point."""
    out = []
    for point, _ in LOAD_POINTS:
        slo = runs["slo", point]
        for p in BASELINES:
            other = runs[p, point]
            a, b = slo.classes["interactive"].attainment, other.classes["interactive"].attainment
            if round(a, 3) < round(b, 3):
                out.append(f"interactive at {point} below {p} ({a:.1%} vs {b:.1%})")
            g, h = slo.goodput.tokens_per_s, other.goodput.tokens_per_s
            if g < 0.999 * h:
                out.append(f"goodput at {point} below {p} ({g:,.0f} vs {h:,.0f} tok/s)")
    return out


def findings(sweeps: dict[str, dict[str, Goodput]], loads: Loads, bounds: Bounds, gaps: Gaps) -> list[str]:
    lines = ["## Findings", ""]
    lagging = {wl: behind(loads[wl]) for wl in WORKLOAD_NAMES}
    if not any(lagging.values()):
        lines.append("- **slo is at or above every baseline** on interactive attainment and on all-class goodput "
                     f"at every load ({', '.join(p for p, _ in LOAD_POINTS)} the knee) of every workload.")
    admitted = [loads[wl]["slo", DETAIL].classes["interactive"] for wl in WORKLOAD_NAMES]
    met = [m.admitted_attainment for m in admitted]
    shed = [m.rejected / m.jobs for m in admitted]
    plain = [loads[wl][BEST_EFFORT, DETAIL].classes["interactive"].attainment for wl in WORKLOAD_NAMES]
    lines.append(f"- **At {DETAIL} the knee** slo's admitted interactive jobs met their target "
                 f"{min(met):.1%}-{max(met):.1%} of the time, shedding {min(shed):.0%}-{max(shed):.0%} of them "
                 "at once with a retry-after hint; with admission off (best-effort) the same router met "
                 f"{min(plain):.1%}-{max(plain):.1%} of all of them.")
    for wl in WORKLOAD_NAMES:
        runs = loads[wl]
        slo = sweeps[wl]["slo"].rate
        best_p = max(BASELINES, key=lambda p: sweeps[wl][p].rate)
        best = sweeps[wl][best_p].rate
        verdict = "higher than" if slo > best else ("equal to" if slo == best else "LOWER than")
        knee, bound = runs["slo", "knee"], bounds[wl]["knee"]
        inter = knee.classes["interactive"].attainment
        share = knee.goodput.tokens_per_s / bound.tokens_per_s if bound.tokens_per_s else 1.0
        late = f" Behind: {'; '.join(lagging[wl])}." if lagging[wl] else ""
        lines.append(f"- **{wl}**: slo goodput {slo:.1f} jobs/s, {verdict} the best baseline ({best_p}, "
                     f"{best:.1f}). At the knee ({WORKLOADS[wl].rate * knee.multiplier:.0f} jobs/s) slo attains "
                     f"{inter:.1%} of interactive jobs, {100 * (bound.interactive - inter):.1f} points under the "
                     f"upper bound ({bound.interactive:.1%}), and {share:.1%} of the bound on all-class goodput."
                     f"{late}")
    closest = {wl: bounds[wl]["knee"].interactive - max(g.alone, g.split) for wl, g in gaps.items()}
    near = [wl for wl, gap in closest.items() if gap <= 0.05]
    lines.append("- **Where the gap is**: given the bound's two freedoms, serving the interactive jobs alone on "
                 "the shared or the split-by-model fleet (the better of the two), slo comes within 5 points of "
                 f"the interactive bound on {len(near)} of {len(gaps)} workloads "
                 f"({', '.join(near) or 'none'}; {min(closest.values()) * 100:.1f}-{max(closest.values()) * 100:.1f}"
                 " points on all): the rest of the gap is the other classes' work and a shared worker's one "
                 "concurrency, both set above the router (section *Where the gap to the upper bound is*).")
    return [*lines, ""]


CAVEATS = [
    "## How the simulator models the fleet, and what it leaves out", "",
    "- Devices follow `workers/simulated.py` exactly (a test drives both on one virtual clock and compares "
    "every first-token and finish time): TTFT from the profile at the worker's in-flight count when the job "
    "starts, decode in 32-token chunks at the ITL of the in-flight count at each chunk's start.",
    "- A pool has one FIFO queue per priority lane, and a free slot takes the head of a lower lane that runs "
    "fewer jobs on that worker than its reserved slots (`min_share`), else the most urgent waiting job (as "
    "the workers read the pool's lanes); a queued job goes to the worker with the most free slots. Routing "
    "is instant and the router sees exact pool state (backlog = queued + running, and "
    "the queued jobs by lane, as the policy worker reads each lane's lag and pending): a job's predicted "
    "wait counts the running jobs and those queued on its own and more urgent lanes. "
    "`--snapshot-interval 0.25` mimics the live refresh.",
    "- Outside the misbelief section the devices are exactly as the router believes and never fail; no "
    "retries, no network; the "
    "accelerator's cap is enforced by its slots (the config refuses concurrency above the device cap), so "
    "it never answers 429 here.",
    "- One seed per point: attainment near the target moves by about a point between seeds, so goodput "
    "differences under ~5% are noise.",
    "",
]


def write_report(path: Path, s: Settings, sweeps: dict[str, dict[str, Goodput]], loads: Loads, bounds: Bounds,
                 gaps: Gaps, fleets: dict[str, dict[str, list[FleetRun]]], misbelief: str,
                 timing: dict[str, float]) -> None:
    import matplotlib

    per_min = [r.seconds * 60 / s.duration for wl in loads.values() for (label, p), r in wl.items()
               if label != "oracle" and p == "knee"]
    oracle_min = [wl["oracle", "knee"].seconds * 60 / s.duration for wl in loads.values()]
    jobs = [sum(m.jobs for c, m in r.classes.items() if c != "all") for wl in loads.values()
            for (_, p), r in wl.items() if p == "knee"]
    lines = [
        "# Routing policies in simulation", "",
        "Generated by `python -m bench.policy_report` from `evaluation/simulator.py`, `evaluation/workloads.py` "
        "and `evaluation/bound.py` (do not edit by hand; regenerate). Same seed, same numbers.", "",
        f"Generated in {timing['total']:.0f} s on {os.cpu_count()} CPU cores (Python "
        f"{platform.python_version()}, matplotlib {matplotlib.__version__}). A simulated minute at the knee "
        f"({min(jobs):,}-{max(jobs):,} jobs per run) took {min(per_min):.2f}-{max(per_min):.2f} s per "
        f"policy, {min(oracle_min):.1f}-{max(oracle_min):.1f} s for the oracle (its lookahead).", "",
    ]
    lines += findings(sweeps, loads, bounds, gaps)
    lines += setup_section(s)
    lines += goodput_section(sweeps)
    lines += loads_section(loads, bounds)
    lines += gap_section(gaps, loads, bounds)
    lines += detail_section(loads)
    lines += cost_section(fleets, s)
    lines += [misbelief, ""]
    lines += CAVEATS
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short runs and few fleets (checks the script)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for POLICY.md and the PNGs")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        import scipy  # noqa: F401  (the upper bound's LP)
    except ImportError as exc:
        print(f"the report needs {exc.name}: pip install 'inference-broker[report]'", file=sys.stderr)
        return 1
    matplotlib.use("Agg")
    s = QUICK if args.quick else FULL
    started = time.perf_counter()
    timing: dict[str, float] = {}

    def phase(name: str) -> None:
        timing[name] = time.perf_counter() - started
        print(f"[{timing[name]:6.1f} s] {name}", file=sys.stderr, flush=True)

    sweeps: dict[str, dict[str, Goodput]] = {wl: {} for wl in WORKLOAD_NAMES}
    for wl, policy, g in parallel(sweep_task, [(wl, p, s.duration, s.refine) for wl in WORKLOAD_NAMES
                                               for p in POLICIES], args.jobs):
        sweeps[wl][policy] = g
    phase("goodput sweeps")
    knee = {wl: knee_multiplier(sweeps[wl]) for wl in WORKLOAD_NAMES}
    tasks = [(wl, label, p, knee[wl] * m, s.duration) for wl in WORKLOAD_NAMES for p, m in LOAD_POINTS
             for label in LABELS]
    loads: Loads = {wl: {} for wl in WORKLOAD_NAMES}
    for run in parallel(load_task, tasks, args.jobs):
        loads[run.workload][run.label, run.point] = run
    bounds: Bounds = {wl: {} for wl in WORKLOAD_NAMES}
    for b in parallel(bound_task, [(wl, p, knee[wl] * m, s.duration) for wl in WORKLOAD_NAMES
                                   for p, m in LOAD_POINTS], args.jobs):
        bounds[b.workload][b.point] = b
    gaps: Gaps = {g.workload: g for g in parallel(gap_task, [(wl, knee[wl], s.duration) for wl in WORKLOAD_NAMES],
                                                  args.jobs)}
    phase("load points, bounds and gaps")
    cost_mult = dict(LOAD_POINTS)[COST_POINT]
    fleet_tasks = [(wl, p, g, a, knee[wl] * cost_mult, s.duration) for wl in WORKLOAD_NAMES
                   for p in COST_POLICIES for g, a in fleets_for(p, s)]
    fleets: dict[str, dict[str, list[FleetRun]]] = {wl: {p: [] for p in COST_POLICIES} for wl in WORKLOAD_NAMES}
    for fr in parallel(fleet_task, fleet_tasks, args.jobs):
        fleets[fr.workload][fr.policy].append(fr)
    phase("fleet sweeps")
    misbelief = misbelief_section(quick=args.quick)
    phase("misbelief scenarios")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_attainment(sweeps, args.out / "policy_attainment_vs_load.png")
    plot_cost(fleets, args.out / "policy_cost_vs_attainment.png")
    plot_cdf(loads, args.out / "policy_latency_cdf.png")
    timing["total"] = time.perf_counter() - started
    write_report(args.out / "POLICY.md", s, sweeps, loads, bounds, gaps, fleets, misbelief, timing)
    phase("report written")
    print(args.out / "POLICY.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
