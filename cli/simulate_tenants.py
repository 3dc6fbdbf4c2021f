"""``inference-broker simulate --scenario noisy-neighbour``: the tenants' scenarios, run and shown.

The scenarios and the metrics are pure (:mod:`evaluation.tenancy`); this module runs each
variant for each policy and prints one row per variant and tenant, at 80 columns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cli.runstats import span_text
from evaluation import simulator
from evaluation.metrics import summarize
from evaluation.options import SimOptions
from evaluation.tenancy import VARIANTS, NoisyNeighbour, TenantMetrics, by_tenant, within
from policies.config import PolicyConfig
from policies.router import Router


def run_variants(base: PolicyConfig, names: list[str], make: Callable[[str, PolicyConfig], Router],
                 scenario: NoisyNeighbour, fleet: Mapping[str, int], seed: int, duration: float,
                 options: SimOptions) -> list[dict[str, Any]]:
    """One entry per (policy, variant), as ``simulate --json`` prints them."""
    out: list[dict[str, Any]] = []
    for name in names:
        for variant in VARIANTS:
            cfg = scenario.config(base, variant)
            result = simulator.simulate(cfg, make(name, cfg), scenario.arrivals(seed, duration, variant), fleet,
                                        seed, duration, options=options)
            out.append({"policy": name, "scenario": scenario.name, "variant": variant, "duration": duration,
                        "seed": seed, "fleet": dict(fleet), "end": result.end, "tenants": by_tenant(result),
                        "classes": summarize(result, cfg)})
    return out


def _row(variant: str, m: TenantMetrics) -> list[str]:
    retry = "-" if m.retry_after_p50_s is None else f"{m.retry_after_p50_s:.2f}s"
    slo = m.rejected - m.quota - m.fair_share
    return [f"  {variant} {m.tenant}", str(m.jobs), f"{m.attainment:.1%}", f"{m.quota}/{m.fair_share}/{slo}",
            span_text(m.ttft_p50_ms, m.ttft_p99_ms), retry, f"{m.tokens / 1e6:.1f}"]


def print_variants(runs: list[dict[str, Any]], scenario: NoisyNeighbour) -> None:
    """A table of ``run_variants``' entries, then the 3-point check for each policy."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    first = runs[0]
    fleet = ", ".join(f"{p}={n}" for p, n in first["fleet"].items())
    table = Table(title=f"{scenario.name} for {first['duration']:.0f} s, fleet {fleet}, seed {first['seed']}",
                  header_style="bold", padding=(0, 1), box=box.SIMPLE_HEAD, show_edge=False,
                  collapse_padding=True,
                  caption=f"{scenario.description}. alone: {scenario.quiet} only; quotas: both, limits and fair "
                          "share; fair-share: weights only; none: no tenants configured. met: share of all the "
                          "tenant's jobs that met the SLO (--json adds admitted_attainment); refused: by quota / "
                          "fair share / SLO admission; retry: median retry-after of its refusals; Mtok: "
                          "prompt and output tokens served.")
    table.add_column("policy, variant tenant", no_wrap=True)
    for col in ("jobs", "met", "refused", "TTFT p50/p99", "retry", "Mtok"):
        table.add_column(col, justify="right", no_wrap=True)
    verdicts: list[str] = []
    for policy in dict.fromkeys(run["policy"] for run in runs):
        table.add_row(f"[bold]{policy}[/]")
        mine = {run["variant"]: run["tenants"] for run in runs if run["policy"] == policy}
        for variant, tenants in mine.items():
            for m in tenants.values():
                table.add_row(*_row(variant, m))
        table.add_section()
        alone, beside = mine["alone"].get(scenario.quiet), mine["quotas"].get(scenario.quiet)
        if alone is not None and beside is not None:
            ok = within(alone, beside)
            verdicts.append(f"{policy}: {scenario.quiet} {beside.attainment:.1%} beside {scenario.noisy} "
                            f"vs {alone.attainment:.1%} alone: [{'green' if ok else 'red'}]"
                            f"{'within' if ok else 'NOT within'} 3 points[/]")
    console = Console()
    console.print(table)
    for line in verdicts:
        console.print(line)
