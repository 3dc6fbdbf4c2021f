"""Misbelief scenarios: the SLO router on hardware that is not what it believes.

Run from the repository root::

    python -m bench.misbelief            # seeds 1-3, 60 s of arrivals each: about a minute on 2 cores
    python -m bench.misbelief --quick    # one seed, 20 s: to check the script

prints a markdown section (:func:`misbelief_section`, for bench/POLICY.md): for each named
scenario of :mod:`evaluation.scenarios` (and ``none``: the truth is the profile), the interactive
attainment of ``slo`` (which believes the profiles and learns), of ``true_profile`` (``slo``
believing the truth from the start, :func:`evaluation.scenarios.believing`) and of the ``static``
baseline; what ``slo`` learned about the pool the scenario touches and how soon; and how many
jobs each router sent to a pool with no live worker. Deterministic: same seeds, same numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: python bench/misbelief.py
    sys.path.insert(0, str(HERE.parent))

from broker.config import load_config  # noqa: E402
from evaluation.baselines import ROUTERS  # noqa: E402
from evaluation.metrics import attainment  # noqa: E402
from evaluation.options import SimOptions  # noqa: E402
from evaluation.scenarios import SCENARIOS, Scenario, Watch, believing, routed_to_dead  # noqa: E402
from evaluation.simulator import simulate  # noqa: E402
from evaluation.workloads import WORKLOADS  # noqa: E402
from policies.config import PolicyConfig  # noqa: E402
from policies.slo import SloRouter  # noqa: E402

FLEET = {"gpu": 4, "accel": 1}
"""The default fleet (``inference-broker simulate``): every section of bench/POLICY.md runs on it."""
WORKLOAD = "mixed"
RATE = 160.0
"""Jobs/s: about ``mixed``'s interactive goodput for slo on ``FLEET`` in bench/POLICY.md (162.5
jobs/s): routing matters most there, and a wrong belief shows."""
SEEDS, DURATION = (1, 2, 3), 60.0
QUICK_SEEDS, QUICK_DURATION = (1,), 20.0
TOLERANCE = 0.25
"""A factor counts as learned within this share of the truth (the tests' bound)."""


@dataclass(frozen=True)
class Run:
    """One scenario, one seed."""

    slo: float
    true_profile: float
    static: float
    factors: tuple[float, float] | None
    """slo's (TTFT, TPOT) factors for the touched pool's main model at the end of the arrivals."""
    learned_at: float | None
    """When both were first within ``TOLERANCE`` of the truth (None: never, or nothing to learn)."""
    dead_window: int
    """Jobs slo sent to a pool with no live worker while its heartbeats still counted."""
    dead_after: tuple[int, int]
    """Jobs (slo, static) sent to a pool with no live worker once its heartbeats had run out."""
    reruns: int
    """Jobs slo's run lost with a dead worker and ran again."""


def run_one(config: PolicyConfig, scenario: Scenario | None, seed: int, duration: float) -> tuple[Run, str, float]:
    """The three routers on one seed; also the watched pool's main model and the truth's factor there."""
    options = scenario.options(config, duration) if scenario is not None else SimOptions()
    pools = scenario.targets(config) if scenario is not None else [config.default_pool]
    work = WORKLOADS[WORKLOAD].at_rate(RATE)
    watch = Watch(SloRouter(config), pools[0])
    slo = simulate(config, watch, work, FLEET, seed, duration, options=options)
    told = simulate(config, believing(config, options, FLEET), work, FLEET, seed, duration, options=options)
    static = simulate(config, ROUTERS["static"](config), work, FLEET, seed, duration, options=options)
    truth = options.truth.get(pools[0])
    target = truth.mean_factor(FLEET.get(pools[0], 0)) if truth is not None else 1.0
    learned = watch.learned_at(target, TOLERANCE) if abs(target - 1) > TOLERANCE else None
    return Run(slo=attainment(slo, "interactive"), true_profile=attainment(told, "interactive"),
               static=attainment(static, "interactive"),
               factors=watch.at(duration) if truth is not None else None, learned_at=learned,
               dead_window=routed_to_dead(slo, options, grace_s=0.0) - routed_to_dead(slo, options),
               dead_after=(routed_to_dead(slo, options), routed_to_dead(static, options)),
               reruns=sum(r.attempts > 1 for r in slo.records)), watch.model() or "-", target


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def misbelief_section(quick: bool = False) -> str:
    """The markdown section: one row per scenario, seeds averaged."""
    config = load_config()
    seeds, duration = (QUICK_SEEDS, QUICK_DURATION) if quick else (SEEDS, DURATION)
    started = time.perf_counter()
    rows: list[str] = []
    for name in ("none", *SCENARIOS):
        scenario = SCENARIOS.get(name)
        results = [run_one(config, scenario, seed, duration) for seed in seeds]
        runs = [r for r, _, _ in results]
        model, target = results[0][1], results[0][2]
        pool = scenario.targets(config)[0] if scenario is not None else "-"
        if runs[0].factors is not None:
            ttft = _mean([r.factors[0] for r in runs if r.factors is not None])
            tpot = _mean([r.factors[1] for r in runs if r.factors is not None])
            factor = f"{ttft:.2f} / {tpot:.2f} ({target:.2f}, {pool} {model})"
        else:
            factor = "-"
        times = [r.learned_at for r in runs]
        if abs(target - 1) <= TOLERANCE:
            learned = "-"
        elif any(t is None for t in times):
            learned = f"not in {sum(t is None for t in times)} of {len(times)} seeds"
        else:
            low, high = min(t for t in times if t is not None), max(t for t in times if t is not None)
            learned = f"{low:.1f} s" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}-{high:.1f} s"
        failed = scenario is not None and scenario.fail
        whole = scenario is not None and scenario.fail and scenario.fail_workers is None  # a pool dies
        dead = (f"{sum(r.dead_window for r in runs)} / {sum(r.dead_after[0] for r in runs)} / "
                f"{sum(r.dead_after[1] for r in runs)}") if whole else "-"
        reruns = f"{_mean([r.reruns for r in runs]):.0f}" if failed else "-"
        description = scenario.description if scenario is not None else "the devices follow their profiles"
        rows.append(f"| {name} | {description} | {_mean([r.slo for r in runs]):.1%} | "
                    f"{_mean([r.true_profile for r in runs]):.1%} | {_mean([r.static for r in runs]):.1%} | "
                    f"{factor} | {learned} | {dead} | {reruns} |")
    elapsed = time.perf_counter() - started
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}, averaged"
    fleet = ", ".join(f"{p}={n}" for p, n in FLEET.items())
    return "\n".join([
        "## Misbelief: hardware that is not what the router believes",
        "",
        f"Generated by `python -m bench.misbelief{' --quick' if quick else ''}` in {elapsed:.0f} s. "
        f"`{WORKLOAD}` at {RATE:g} jobs/s (about slo's goodput there) on {fleet}, {duration:g} s of arrivals, "
        f"{seed_text}; "
        "the built-in policy. Each scenario (`evaluation/scenarios.py`, `inference-broker simulate --scenario "
        "NAME`) makes the simulated devices differ from the profiles every router plans with. "
        "**slo** believes the profiles and learns from finished jobs; **true profile** is slo believing the "
        "truth from the start (each pool's profile times the truth's mean slow-down); **static** is the "
        "rules-and-backlog baseline. Failures come at 1/3 of the run and recover at 2/3; the policy counts "
        "a dead worker until its heartbeats run out (5 s live, 15 s in `heartbeat-lag`), and a dead "
        "worker's jobs go back to its pool after the live claim timeout (30 s).",
        "",
        "| scenario | truth | slo | true profile | static | learned factor TTFT / TPOT (truth, pool model) "
        "| learned within | to a dead pool: slo in window / slo after / static after | jobs run again |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Columns: interactive SLO attainment (share of all interactive jobs that met 500 ms TTFT and 40 ms TPOT); "
        "the factors slo learned (observed / profile) for the model that ran most on the touched pool, at the end "
        f"of the arrivals; the time into the run at which both were first within {TOLERANCE:.0%} of the truth "
        "(range over seeds; `-`: within that from the start); jobs sent to a pool with no live worker while its "
        "heartbeats still counted (slo) and after (slo, static), summed over seeds; jobs of a dead worker run again "
        "(slo, mean).",
        "",
        "Reading it: the factors are learned in log space (a geometric mean), so a noisy device's mean-1 noise "
        "reads below 1 and a rare heavy tail barely moves them, by design (one outlier must not move the "
        "estimate); the slow node's 3x is diluted by its share of the jobs. A pool failure costs the jobs in "
        "flight (run again after the claim timeout) and those sent before the heartbeats ran out, which wait "
        "for the recovery.",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one seed, 20 s runs (checks the script)")
    args = parser.parse_args(argv)
    print(misbelief_section(quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
