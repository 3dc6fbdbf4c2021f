"""Regenerate ``bench/POLICY.md`` and its plots: every routing policy in the simulator.

Run from the repository root (needs matplotlib, the ``report`` extra)::

    python -m bench.policy_report            # the full report, a few minutes on 2 cores
    python -m bench.policy_report --quick    # short runs, to check the script

Everything simulated is deterministic (seeded); only the timings in the header change
between runs. The numbers come from :mod:`policies.simulator` and :mod:`policies.workloads`;
this script only sweeps, tabulates and plots.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
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

from broker.config import load_config  # noqa: E402
from broker.simulate_cli import ORDER  # noqa: E402
from policies.baselines import ROUTERS  # noqa: E402
from policies.config import PolicyConfig  # noqa: E402
from policies.profiles import PROFILES  # noqa: E402
from policies.simulator import (  # noqa: E402
    MULTIPLIERS,
    ClassMetrics,
    Goodput,
    SimOptions,
    goodput,
    simulate,
    summarize,
)
from policies.workloads import WORKLOADS, Bursty, Diurnal, Poisson  # noqa: E402

SEED = 1
FLEET = {"gpu": 4, "accel": 1}
WORKLOAD_NAMES = ("chat", "code", "mixed", "diurnal")
POLICIES = tuple(n for n in ORDER if n in ROUTERS)
REFERENCE = ("slo", "oracle")
BASELINES = tuple(n for n in POLICIES if n not in REFERENCE)
GPU_GRID = (1, 2, 3, 4, 6, 8, 12)
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


def sweep_task(args: tuple[str, str, float, int]) -> tuple[str, str, Goodput]:
    """Interactive goodput of one policy on one workload, with the attainment-vs-load points."""
    workload, policy, duration, refine = args
    cfg = config()
    g = goodput(cfg, lambda: ROUTERS[policy](cfg), WORKLOADS[workload], FLEET, SEED, duration,
                refine=refine, floor=FLOOR, options=OPTIONS)
    return workload, policy, g


@dataclass(frozen=True)
class LoadRun:
    workload: str
    policy: str
    multiplier: float
    classes: dict[str, ClassMetrics]
    ttft_ms: list[float]
    """Interactive jobs' TTFT; jobs not served count as infinite."""
    e2e_ms: list[float]
    seconds: float


def load_task(args: tuple[str, str, float, float]) -> LoadRun:
    """Every class's metrics for one policy at one load, and the interactive latencies for CDFs."""
    workload, policy, multiplier, duration = args
    cfg = config()
    started = time.perf_counter()
    result = simulate(cfg, ROUTERS[policy](cfg), WORKLOADS[workload].scaled(multiplier), FLEET, SEED, duration,
                      options=OPTIONS)
    seconds = time.perf_counter() - started
    inter = [r for r in result.records if r.cls == "interactive"]
    return LoadRun(workload, policy, multiplier, summarize(result, cfg),
                   [r.ttft_ms if r.ttft_ms is not None and r.status == "ok" else math.inf for r in inter],
                   [r.e2e_ms if r.e2e_ms is not None and r.status == "ok" else math.inf for r in inter], seconds)


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


def break_multiplier(sweeps: dict[str, Goodput]) -> float:
    """The lowest grid load above the best baseline's goodput: where every baseline has broken."""
    best = max(sweeps[p].multiplier for p in BASELINES if p in sweeps)
    above = [m for m in MULTIPLIERS if m > best]
    return above[0] if above else MULTIPLIERS[-1]


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


STYLE = {"slo": dict(color="black", lw=2.4), "oracle": dict(color="black", lw=1.2, ls="--")}


def _style(policy: str, i: int) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    return STYLE.get(policy, dict(color=plt.get_cmap("tab10")(i % 10), lw=1.3))


def plot_attainment(sweeps: dict[str, dict[str, Goodput]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharey=True)
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

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharey=True)
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
        ax.set_title(f"{wl} at {rate:.0f} jobs/s, fleets {min(GPU_GRID)}-{max(GPU_GRID)} GPU x "
                     f"{min(ACCEL_GRID)}-{max(ACCEL_GRID)} accel")
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


def plot_cdf(loads: dict[str, dict[str, LoadRun]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5), sharey=True)
    target = config().classes["interactive"]
    for col, wl in enumerate(WORKLOAD_NAMES):
        for row, (field, label, limit) in enumerate((("ttft_ms", "TTFT", target.ttft_ms),
                                                     ("e2e_ms", "end-to-end", None))):
            ax = axes[row, col]
            for i, policy in enumerate(POLICIES):
                run = loads[wl][policy]
                values = sorted(getattr(run, field))
                n = len(values)
                finite = [v for v in values if math.isfinite(v)]
                ax.plot([max(v, 1.0) for v in finite], [(k + 1) / n for k in range(len(finite))], label=policy,
                        **_style(policy, i))
            if limit is not None:
                ax.axvline(limit, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
            mult = loads[wl][POLICIES[0]].multiplier
            ax.set_title(f"{wl} at {WORKLOADS[wl].rate * mult:.0f} jobs/s: interactive {label}")
            ax.set_xlabel(f"{label} (ms, log)")
            ax.grid(alpha=0.3, which="both")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of interactive jobs")
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Interactive latency CDFs at the load where the baselines break (dotted: TTFT target)")
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
    lines += ["Workloads (`policies/workloads.py`): token counts are lognormal fits to published percentiles "
              "(mu = ln p50, sigma = ln(pX/p50)/z_X):", ""]
    rows = []
    for name in WORKLOAD_NAMES:
        w = WORKLOADS[name]
        arr = w.arrivals
        if isinstance(arr, Bursty):
            how = f"hyperexponential, CV {arr.cv:g}"
        elif isinstance(arr, Diurnal):
            how = f"Poisson x (1 - {arr.amplitude:g} cos 2 pi t/T), T = run"
        else:
            assert isinstance(arr, Poisson)
            how = "Poisson"
        rows.append([name, f"{w.rate:g}", how, w.description])
    lines += _table(["workload", "base rate (jobs/s)", "arrivals", "mix"], rows)
    from policies.workloads import CODE, CONVERSATION

    rows = []
    for shape in (CONVERSATION, CODE):
        for part, d in (("input", shape.prompt), ("output", shape.output)):
            rows.append([shape.name, part, f"{d.mu:.3f}", f"{d.sigma:.3f}", f"{d.quantile(0.5):,.0f}",
                         f"{d.quantile(0.9):,.0f}", f"{d.quantile(0.99):,.0f}"])
    lines += _table(["trace shape", "tokens", "mu", "sigma", "p50", "p90", "p99"], rows)
    lines += [
        "Conversation fitted on p50/p90 (1,020/2,700 in, 130/420 out); code on p50/p99 of the released "
        "2023 CSV (1,470/7,436 in, 13/249 out; its means 2,048 and 28 against the fit's ~1,870 and ~29). "
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
        "first miss.",
        "- **Cost per 1M output tokens**: the *provisioned* fleet (every worker, busy or idle, at its pool's "
        "$/h, for the whole run) divided by the output tokens served. Per class, each pool's cost is split "
        "by the classes' busy share of it (each job pays its worker's $/h divided by the jobs in flight, "
        "integrated over its life). *Busy* cost counts only worker-time with jobs in flight.",
        "- **Accel share**: share of served jobs that ran on a pool whose device has a hard cap.",
        "- **oracle**: the SLO router's rules fed the truth: for the job being decided and each pool, the "
        "simulator copies the pool and runs it forward (no future arrivals), giving the job's real queue wait, "
        "TTFT and time per token there. It knows the present exactly, not the future.",
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


def load_section(loads: dict[str, dict[str, LoadRun]]) -> list[str]:
    lines = ["## Per class at the load where the baselines break", "",
             "For each workload, the lowest grid load above the best baseline's goodput (so every baseline "
             "misses the interactive target there). Latencies p50 / p99 from submission.", ""]
    for wl in WORKLOAD_NAMES:
        runs = loads[wl]
        mult = runs[POLICIES[0]].multiplier
        inter = {p: runs[p].classes["interactive"].attainment for p in POLICIES}
        best_base = max(BASELINES, key=lambda p: inter[p])
        lines += [f"### {wl} at {WORKLOADS[wl].rate * mult:.1f} jobs/s (x{mult:g})", "",
                  f"Interactive attainment: slo {inter['slo']:.1%}, oracle {inter['oracle']:.1%} "
                  f"(gap {100 * (inter['oracle'] - inter['slo']):+.1f} points), best baseline {best_base} "
                  f"{inter[best_base]:.1%}.", ""]
        rows = []
        for policy in POLICIES:
            for cls, m in runs[policy].classes.items():
                met, admitted = f"{m.attainment:.1%}", f"{m.admitted_attainment:.1%}"
                if m.target is not None and m.attainment >= m.target:
                    met = f"**{met}**"
                if m.target is not None and m.admitted_attainment >= m.target:
                    admitted = f"**{admitted}**"
                rows.append([policy if cls == next(iter(runs[policy].classes)) else "", cls, str(m.jobs), met,
                             admitted, str(m.rejected), str(m.failed), f"{_ms(m.ttft_p50_ms)} / {_ms(m.ttft_p99_ms)}",
                             f"{_ms(m.e2e_p50_ms)} / {_ms(m.e2e_p99_ms)}", _usd(m.cost_per_mtok),
                             _usd(m.busy_cost_per_mtok), f"{m.accel_share:.0%}"])
        lines += _table(["policy", "class", "jobs", "SLO met", "met of admitted", "shed", "failed", "TTFT p50 / p99",
                         "e2e p50 / p99",
                         "$/1M tok", "$/1M tok busy", "accel share"], rows)
    lines += ["![latency CDFs](policy_latency_cdf.png)", ""]
    return lines


OVERLOAD_RATES = (155.0, 180.0)
"""``mixed`` at about 1.3x and 1.5x the rate where slo meets the interactive target on ``FLEET``."""
OVERLOAD_S = 30.0


def admission_config() -> PolicyConfig:
    """The default policy with admission on: every class ``on_unattainable = "shed"``."""
    cfg = config()
    return msgspec.structs.replace(cfg, classes={
        name: msgspec.structs.replace(cls, on_unattainable="shed") for name, cls in cfg.classes.items()})


def admission_section() -> list[str]:
    """Past capacity: slo with admission, slo best-effort (the default) and static, every class."""
    variants = (("slo, admission", "slo", admission_config()), ("slo", "slo", config()),
                ("static", "static", config()))
    lines = ["## Overload: admission", "",
             f"`mixed` at {' and '.join(f'{r:.0f}' for r in OVERLOAD_RATES)} jobs/s (about 1.3x and 1.5x the "
             f"rate where slo meets the interactive target) on {FLEET['gpu']} GPU workers + {FLEET['accel']} "
             f"accelerator, {OVERLOAD_S:.0f} s of arrivals, seed {SEED}. `slo, admission` is the `slo` router "
             "with every class `on_unattainable = \"shed\"`: it refuses a job that no pool is predicted to "
             "serve in time (docs/configuration.md, admission); `slo` is the default, best-effort for every "
             "class. *SLO met* counts shed jobs as misses; *met of admitted* leaves them out.", ""]
    rows = []
    for rate in OVERLOAD_RATES:
        for label, policy, cfg in variants:
            result = simulate(cfg, ROUTERS[policy](cfg), WORKLOADS["mixed"].at_rate(rate), FLEET, SEED, OVERLOAD_S,
                              options=OPTIONS)
            for cls, m in summarize(result, cfg).items():
                first = cls == next(iter(cfg.classes))
                rows.append([f"{rate:.0f}" if first and label == variants[0][0] else "", label if first else "",
                             cls, str(m.jobs), f"{m.attainment:.1%}", f"{m.admitted_attainment:.1%}", str(m.rejected),
                             f"{_ms(m.ttft_p50_ms)} / {_ms(m.ttft_p99_ms)}"])
    lines += _table(["jobs/s", "policy", "class", "jobs", "SLO met", "met of admitted", "shed", "TTFT p50 / p99"],
                    rows)
    return lines


def cost_section(fleets: dict[str, dict[str, list[FleetRun]]], s: Settings) -> list[str]:
    target = config().classes["interactive"].attainment
    lines = ["## Cost to meet the interactive target at the break load", "",
             "Each policy at each workload's break load (the rates of the per-class tables above) on fleets of "
             f"{', '.join(map(str, s.fleets_gpu))} GPU "
             f"workers x {', '.join(map(str, s.fleets_accel))} accelerators (accelerator-only also on "
             f"{', '.join(map(str, ACCEL_ONLY_GRID))} accelerators without GPUs): the cheapest fleet whose "
             f"interactive attainment reaches {target:.0%}, and its provisioned cost per 1M output tokens. "
             "(The oracle is left out: its look-ahead is slow on overloaded fleets.) A router that sends "
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
    lines += _table(["policy", *(f"{wl} ({rates[wl]:g}/s)" for wl in WORKLOAD_NAMES)], rows)
    lines += ["Cells: GPU workers + accelerators, fleet cost per hour, cost per 1M output tokens (interactive "
              "attainment).", "", "![cost vs attainment](policy_cost_vs_attainment.png)", ""]
    return lines


def findings(sweeps: dict[str, dict[str, Goodput]], loads: dict[str, dict[str, LoadRun]],
             fleets: dict[str, dict[str, list[FleetRun]]]) -> list[str]:
    target = config().classes["interactive"].attainment
    lines = ["## Findings", ""]
    for wl in WORKLOAD_NAMES:
        slo = sweeps[wl]["slo"].rate
        best_p = max(BASELINES, key=lambda p: sweeps[wl][p].rate)
        best = sweeps[wl][best_p].rate
        verdict = "higher than" if slo > best else ("equal to" if slo == best else "LOWER than")
        run = loads[wl]
        o, r = run["oracle"].classes["interactive"].attainment, run["slo"].classes["interactive"].attainment
        c_slo, c_acc = cheapest(fleets[wl]["slo"], target), cheapest(fleets[wl]["accel_only"], target)
        if c_slo is not None and c_acc is not None:
            cost = (f"meets the target at {_usd(c_slo.cost_per_mtok)}/1M tokens (fleet {c_slo.gpu}+{c_slo.accel}) "
                    f"vs accelerator-only {_usd(c_acc.cost_per_mtok)}/1M ({c_acc.gpu}+{c_acc.accel})")
        else:
            cost = (f"has {'no' if c_slo is None else f'a {c_slo.gpu}+{c_slo.accel}'} fleet meeting the target, "
                    f"accelerator-only {'none' if c_acc is None else f'{c_acc.gpu}+{c_acc.accel}'}")
        cheap = min((c for p in COST_POLICIES if (c := cheapest(fleets[wl][p], target)) is not None),
                    key=lambda c: (c.per_hour, c.cost_per_mtok or math.inf), default=None)
        overall = "" if cheap is None else (f" The cheapest fleet meeting the target at that load is "
                                            f"{cheap.policy}'s {cheap.gpu}+{cheap.accel} "
                                            f"({_usd(cheap.cost_per_mtok)}/1M).")
        lines.append(f"- **{wl}**: slo goodput {slo:.1f} jobs/s, {verdict} the best baseline ({best_p}, "
                     f"{best:.1f}). At the break load slo attains {r:.1%} and the oracle {o:.1%} "
                     f"({100 * (o - r):+.1f} points). There, slo {cost}.{overall}")
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
    "- Workers never fail; no retries, no network; the accelerator's cap is enforced by its slots (the "
    "config refuses concurrency above the device cap), so it never answers 429 here.",
    "- One seed per point: attainment near the target moves by about a point between seeds, so goodput "
    "differences under ~5% are noise.",
    "- The oracle knows the present, not the future: jobs arriving after a decision can still slow the "
    "job it placed, so in overload it can do worse than the SLO router.",
    "",
]


def write_report(path: Path, s: Settings, sweeps: dict[str, dict[str, Goodput]],
                 loads: dict[str, dict[str, LoadRun]], fleets: dict[str, dict[str, list[FleetRun]]],
                 timing: dict[str, float]) -> None:
    import matplotlib

    per_min = [r.seconds * 60 / s.duration for wl in loads.values() for p, r in wl.items() if p != "oracle"]
    oracle_min = [wl["oracle"].seconds * 60 / s.duration for wl in loads.values()]
    jobs = [sum(m.jobs for c, m in r.classes.items() if c != "all") for wl in loads.values() for r in wl.values()]
    lines = [
        "# Routing policies in simulation", "",
        "Generated by `python -m bench.policy_report` from `policies/simulator.py` and `policies/workloads.py` "
        "(do not edit by hand; regenerate). Same seed, same numbers.", "",
        f"Generated in {timing['total']:.0f} s on {os.cpu_count()} CPU cores (Python "
        f"{platform.python_version()}, matplotlib {matplotlib.__version__}). A simulated minute at the break "
        f"loads ({min(jobs):,}-{max(jobs):,} jobs per run) took {min(per_min):.2f}-{max(per_min):.2f} s per "
        f"policy, {min(oracle_min):.1f}-{max(oracle_min):.1f} s for the oracle (its look-ahead).", "",
    ]
    lines += findings(sweeps, loads, fleets)
    lines += setup_section(s)
    lines += goodput_section(sweeps)
    lines += load_section(loads)
    lines += admission_section()
    lines += cost_section(fleets, s)
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
    except ImportError:
        print("the report needs matplotlib: pip install 'inference-broker[report]'", file=sys.stderr)
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
    tasks = [(wl, p, break_multiplier(sweeps[wl]), s.duration) for wl in WORKLOAD_NAMES for p in POLICIES]
    loads: dict[str, dict[str, LoadRun]] = {wl: {} for wl in WORKLOAD_NAMES}
    for run in parallel(load_task, tasks, args.jobs):
        loads[run.workload][run.policy] = run
    phase("break-load runs")
    fleet_tasks = [(wl, p, g, a, break_multiplier(sweeps[wl]), s.duration) for wl in WORKLOAD_NAMES
                   for p in COST_POLICIES for g, a in fleets_for(p, s)]
    fleets: dict[str, dict[str, list[FleetRun]]] = {wl: {p: [] for p in COST_POLICIES} for wl in WORKLOAD_NAMES}
    for fr in parallel(fleet_task, fleet_tasks, args.jobs):
        fleets[fr.workload][fr.policy].append(fr)
    phase("fleet sweeps")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_attainment(sweeps, args.out / "policy_attainment_vs_load.png")
    plot_cost(fleets, args.out / "policy_cost_vs_attainment.png")
    plot_cdf(loads, args.out / "policy_latency_cdf.png")
    timing["total"] = time.perf_counter() - started
    write_report(args.out / "POLICY.md", s, sweeps, loads, fleets, timing)
    phase("report written")
    print(args.out / "POLICY.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
