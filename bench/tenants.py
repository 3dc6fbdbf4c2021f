"""Tenants' quotas and fair share in the simulator: the noisy-neighbour scenario over several seeds.

Run from the repository root::

    python -m bench.tenants --write      # seeds 1-5, 60 s each, two snapshot modes: bench/TENANTS.md
    python -m bench.tenants --quick      # one seed, 10 s: to check the script (prints, writes nothing)

For each variant of :class:`evaluation.tenancy.NoisyNeighbour` (acme alone; acme beside bulk
flooding at 10x its quota with quotas; with the fair share only; with no tenants configured) it
runs the SLO router and reports acme's attainment against its attainment alone, bulk's
admitted rate and its refusals with their retry hints. Twice: with exact snapshots, and with the
live policy worker's lags (a snapshot every 0.25 s, timings learned every 1 s).
Deterministic: same seeds, same numbers.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: python bench/tenants.py
    sys.path.insert(0, str(HERE.parent))

from broker.config import load_config  # noqa: E402
from evaluation.metrics import percentile  # noqa: E402
from evaluation.options import SimOptions  # noqa: E402
from evaluation.simulator import simulate  # noqa: E402
from evaluation.tenancy import TENANT_SCENARIOS, VARIANTS, TenantMetrics, by_tenant  # noqa: E402
from policies.slo import SloRouter  # noqa: E402

SEEDS, DURATION = (1, 2, 3, 4, 5), 60.0
QUICK_SEEDS, QUICK_DURATION = (1,), 10.0
MODES = {"exact": SimOptions(), "live lags": SimOptions(snapshot_interval_s=0.25, observation_interval_s=1.0)}


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(seeds: tuple[int, ...], duration: float) -> dict[str, dict[str, list[dict[str, TenantMetrics]]]]:
    """mode -> variant -> one {tenant: metrics} per seed."""
    scenario, base = TENANT_SCENARIOS["noisy-neighbour"], load_config()
    fleet = dict(scenario.fleet)
    out: dict[str, dict[str, list[dict[str, TenantMetrics]]]] = {}
    for mode, options in MODES.items():
        for variant in VARIANTS:
            cfg = scenario.config(base, variant)
            for seed in seeds:
                result = simulate(cfg, SloRouter(cfg), scenario.arrivals(seed, duration, variant), fleet, seed,
                                  duration, options=options)
                out.setdefault(mode, {}).setdefault(variant, []).append(by_tenant(result))
    return out


def _pct(values: list[float]) -> str:
    return f"{min(values):.1%}-{max(values):.1%}" if min(values) != max(values) else f"{values[0]:.1%}"


def section(runs: dict[str, dict[str, list[dict[str, TenantMetrics]]]], seeds: tuple[int, ...],
            duration: float) -> str:
    """The markdown tables and findings of :func:`measure`'s runs."""
    scenario = TENANT_SCENARIOS["noisy-neighbour"]
    quiet, noisy = scenario.quiet, scenario.noisy
    lines: list[str] = []
    for mode, variants in runs.items():
        alone = [r[quiet].attainment for r in variants["alone"]]
        lines += [f"### {mode}", "",
                  f"| variant | {quiet} met | gap to alone (worst seed) | {noisy} met | {noisy} admitted/s "
                  f"| {noisy} refused: quota / fair share / SLO | with retry-after | retry-after p50 / max "
                  f"| Mtok served {quiet} / {noisy} |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for variant, per_seed in variants.items():
            met = [r[quiet].attainment for r in per_seed]
            gap = max(a - m for a, m in zip(alone, met, strict=True)) * 100
            b = [r[noisy] for r in per_seed if noisy in r]
            if not b:
                lines.append(f"| {variant} | {_pct(met)} | {gap:+.1f} pts | - | - | - | - | - "
                             f"| {sum(r[quiet].tokens for r in per_seed) / len(per_seed) / 1e6:.2f} / - |")
                continue
            hints = [m.retry_after_p50_s for m in b if m.retry_after_p50_s is not None]
            quota, fair = sum(m.quota for m in b), sum(m.fair_share for m in b)
            slo = sum(m.rejected for m in b) - quota - fair
            hinted = sum(m.retry_hinted * m.rejected for m in b) / max(1, sum(m.rejected for m in b))
            admitted = sum(m.jobs - m.rejected for m in b) / len(b) / duration
            hint = "-" if not hints else f"{percentile(hints, 0.5):.3f} / {max(hints):.3f} s"
            lines.append(
                f"| {variant} | {_pct(met)} | {gap:+.1f} pts | {_pct([m.attainment for m in b])} | {admitted:.1f} "
                f"| {quota} / {fair} / {slo} | {hinted:.0%} | {hint} "
                f"| {sum(r[quiet].tokens for r in per_seed) / len(per_seed) / 1e6:.2f} / "
                f"{sum(m.tokens for m in b) / len(b) / 1e6:.2f} |")
        lines.append("")
    head = (f"Seeds {', '.join(map(str, seeds))}, {duration:.0f} s of arrivals each, the `slo` router, fleet "
            f"{', '.join(f'{p}={n}' for p, n in scenario.fleet)}, the built-in policy plus the scenario's "
            f"tenants. {scenario.description}. Ranges are over seeds; \"gap\" is {quiet}'s attainment alone "
            "minus beside the flood, worst seed (positive: worse beside it). Retry-after p50 is the median "
            "of each seed's median; SLO refusals are the router's own admission (`slo_unattainable`).")
    return "\n".join([head, "", *lines])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one seed, 10 s; print only")
    parser.add_argument("--write", action="store_true", help="write bench/TENANTS.md")
    args = parser.parse_args(argv)
    seeds, duration = (QUICK_SEEDS, QUICK_DURATION) if args.quick else (SEEDS, DURATION)
    started = time.perf_counter()
    runs = measure(seeds, duration)
    took = time.perf_counter() - started
    text = section(runs, seeds, duration)
    if args.write and not args.quick:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
        header = (f"Generated by `python -m bench.tenants --write` on {stamp}, {cpu()} ({_cores()} cores), "
                  f"Python {platform.python_version()}, in {took:.0f} s. Same seeds, same numbers.")
        (HERE / "TENANTS.md").write_text(_page(header, runs, text))
    print("\n".join(findings(runs)), text, sep="\n\n")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


INTRO = """Issue 19's outcome 3: two tenants in one class, one within its quota and one offering 10x its
own; the well-behaved tenant's attainment must stay within 3 points of what it gets alone, and
quota refusals must carry a retry-after. The same code decides live (`policies/tenants.py`
through `broker/decider.py`) and here (`evaluation/simulator.py`); the scenario is
`evaluation/tenancy.py` (`inference-broker simulate --scenario noisy-neighbour` shows one seed).
Do not edit by hand: regenerate."""


def findings(runs: dict[str, dict[str, list[dict[str, TenantMetrics]]]]) -> list[str]:
    """One line per claim, from the runs."""
    scenario = TENANT_SCENARIOS["noisy-neighbour"]
    quiet, noisy = scenario.quiet, scenario.noisy
    out = []
    for mode, variants in runs.items():
        alone = [r[quiet].attainment for r in variants["alone"]]

        def gap(variant: str, alone: list[float] = alone,
                variants: dict[str, list[dict[str, TenantMetrics]]] = variants) -> float:
            return max(a - r[quiet].attainment for a, r in zip(alone, variants[variant], strict=True)) * 100

        quotas = [r[noisy] for r in variants["quotas"]]
        hinted = all(m.retry_hinted == 1.0 for m in quotas)
        out.append(f"- **{mode}**: with quotas {quiet} is at most {gap('quotas'):.1f} points below its attainment "
                   f"alone ({'within' if gap('quotas') <= 3 else 'NOT within'} 3); {noisy}'s "
                   f"{sum(m.quota for m in quotas)} quota refusals "
                   f"{'all carry' if hinted else 'do not all carry'} a retry-after. Fair share only: "
                   f"{gap('fair-share'):.1f} points. No tenants configured: {gap('none'):.1f} points.")
    return out


def _page(header: str, runs: dict[str, dict[str, list[dict[str, TenantMetrics]]]], text: str) -> str:
    return "\n".join(["# Tenants: quotas and fair share", "", header, "", INTRO, "", "## Findings", "",
                      *findings(runs), "", "## Results", "", text, ""])


if __name__ == "__main__":
    main()
