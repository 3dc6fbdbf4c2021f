"""``inference-broker simulate``: the routing policies on a simulated fleet, one table per run.

The simulation itself is pure (:mod:`evaluation.simulator`); this module only parses options,
loads the policy file and prints. Register it on the main group with
``main.add_command(simulate)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import msgspec

from cli.runstats import span_text
from evaluation import simulator
from evaluation.baselines import ROUTERS
from evaluation.goodput import Goodput, goodput
from evaluation.metrics import ClassMetrics, summarize
from evaluation.options import SimOptions
from evaluation.scenarios import SCENARIOS, believing, routed_to_dead
from evaluation.tenancy import TENANT_SCENARIOS, by_tenant
from evaluation.workloads import WORKLOADS
from policies.config import ConfigError, PolicyConfig, pool_counts
from policies.router import Router

EPILOG = "Docs: README.md, docs/ and bench/POLICY.md in the project repository."
TRUE_PROFILE = "true_profile"
"""The SLO router told the scenario's truth (:func:`evaluation.scenarios.believing`): not in ``all``."""


def policy_names(choice: str) -> list[str]:
    """``all`` or a comma-separated list of router names, checked against the registry."""
    if choice == "all":
        return list(ROUTERS)
    names = [n.strip() for n in choice.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROUTERS and n != TRUE_PROFILE]
    if unknown or not names:
        raise click.BadParameter(f"{choice!r}: expected 'all' or names from {', '.join([*ROUTERS, TRUE_PROFILE])}",
                                 param_hint="--policy")
    return names


def parse_fleet(text: str | None, config: PolicyConfig) -> dict[str, int]:
    """``gpu=4,accel=1`` over the default (4 workers on the default pool, 1 on each other pool)."""
    base = {pool: 4 if pool == config.default_pool else 1 for pool in config.pools}
    try:
        return pool_counts(config, [text or ""], base)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--fleet") from None


def table_rows(metrics: dict[str, ClassMetrics]) -> list[list[str]]:
    """One row per class (then ``all``): the columns of :data:`COLUMNS` (rich markup: met targets green)."""
    rows = []
    for cls, m in metrics.items():
        met, admitted = f"{m.attainment:.1%}", f"{m.admitted_attainment:.1%}"
        if m.target is not None:
            met = f"[{'green' if m.attainment >= m.target else 'red'}]{met}[/]"
            admitted = f"[{'green' if m.admitted_attainment >= m.target else 'red'}]{admitted}[/]"
        cost = "-" if m.cost_per_mtok is None else f"${m.cost_per_mtok:.2f}"
        rows.append([cls, str(m.jobs), met, admitted, f"{m.rejected}/{m.failed}",
                     span_text(m.ttft_p50_ms, m.ttft_p99_ms), cost,
                     f"{m.accel_share:.0%}"])
    return rows


class UnknownScenario(click.ClickException):
    """A usage error (exit 2) on one line, without click's usage block: the names are what helps."""

    exit_code = 2


COLUMNS = ("class", "jobs", "met", "admitted", "shed/fail", "TTFT p50/p99", "$/Mtok", "accel")


@click.command("simulate", epilog=EPILOG)
@click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="chat", show_default=True,
              help="Trace-shaped workload (evaluation/workloads.py).")
@click.option("--policy", "policy", default="all", show_default=True, metavar="NAME[,NAME]|all",
              help=f"Routing policies to compare: {', '.join(ROUTERS)}; also {TRUE_PROFILE} (slo believing "
                   "the --scenario's truth, not in all).")
@click.option("--rate", type=click.FloatRange(min=0.01), help="Mean arrivals per second [default: the workload's].")
@click.option("--duration", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds of arrivals (simulated; jobs then run to completion).")
@click.option("--seed", type=int, default=1, show_default=True, help="Same seed, same jobs, same results.")
@click.option("--fleet", metavar="POOL=N[,POOL=N]",
              help="Workers per pool [default: 4 on the default pool, 1 on others].")
@click.option("--priority/--fifo", default=True, show_default=True,
              help="Order pool queues by class priority, as the live priority lanes do; --fifo: by arrival.")
@click.option("--snapshot-interval", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Seconds between the router's pool snapshots (0: exact; the live policy worker: 0.25).")
@click.option("--observation-interval", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Seconds between batches of job timings the router learns from (0: each job at once; "
                   "live: 1, the heartbeat).")
@click.option("--scenario", metavar="NAME",
              help=f"Make the simulated hardware differ from the profiles the routers believe: "
                   f"{', '.join(SCENARIOS)} (docs/architecture.md); or run the tenants' scenario "
                   f"{', '.join(TENANT_SCENARIOS)} (its own jobs, tenants and fleet; bench/TENANTS.md).")
@click.option("--goodput", "with_goodput", is_flag=True,
              help="Also search each policy's interactive goodput (several runs per policy).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), envvar="IB_CONFIG",
              help="Policy TOML (SLO classes, rules, pools) [env IB_CONFIG; default: built-in].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of tables.")
def simulate_cmd(workload: str, policy: str, rate: float | None, duration: float, seed: int, fleet: str | None,
                 priority: bool, snapshot_interval: float, observation_interval: float, scenario: str | None,
                 with_goodput: bool, config: Path | None, as_json: bool) -> None:
    """Compare routing policies on a simulated fleet (virtual clock, seeded, no Redis).

    Each policy routes the same generated jobs; the table shows per SLO class the share that
    met its target, latency percentiles from submission, the cost per million output tokens
    (the provisioned fleet over the run; --json adds busy_cost_per_mtok, the worker-time with
    jobs in flight only, and per-tenant metrics) and the share served by accelerators.
    Tenants of the policy file ([tenants.NAME]) get their quotas and fair share, as live.

    --scenario noisy-neighbour runs two tenants in one class, one flooding at 10x its quota,
    in four variants (the other alone; quotas; fair share only; no tenants configured) and
    shows each tenant's attainment and refusals; --workload and --rate do not apply to it.
    """
    from broker.config import load_config

    if scenario is not None and scenario not in SCENARIOS and scenario not in TENANT_SCENARIOS:
        raise UnknownScenario(f"unknown scenario {scenario!r}; known: {', '.join([*SCENARIOS, *TENANT_SCENARIOS])}")
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    names = policy_names(policy)
    if scenario in TENANT_SCENARIOS:
        _tenants(cfg, names, scenario, fleet, seed, duration, SimOptions(
            priority_queues=priority, snapshot_interval_s=snapshot_interval,
            observation_interval_s=observation_interval), as_json)
        return
    sizes = parse_fleet(fleet, cfg)
    work = WORKLOADS[workload]
    if rate is not None:
        work = work.at_rate(rate)
    options = SimOptions(priority_queues=priority, snapshot_interval_s=snapshot_interval,
                         observation_interval_s=observation_interval)
    if scenario is not None:
        options = SCENARIOS[scenario].options(cfg, duration, options)

    def make(name: str) -> Router:
        return believing(cfg, options, sizes) if name == TRUE_PROFILE else ROUTERS[name](cfg)

    out: list[dict[str, Any]] = []
    for name in names:
        result = simulator.simulate(cfg, make(name), work, sizes, seed, duration, options=options)
        entry: dict[str, Any] = {
            "policy": name, "workload": workload, "rate": work.rate, "duration": duration, "seed": seed,
            "fleet": sizes, "scenario": scenario, "end": result.end, "classes": summarize(result, cfg),
            "tenants": by_tenant(result)}
        if options.failures:
            entry["routed_to_dead_pool"] = routed_to_dead(result, options)
        if with_goodput:
            def factory(name: str = name) -> Router:
                return make(name)

            entry["goodput"] = goodput(cfg, factory, work, sizes, seed, duration, options=options)
        out.append(entry)
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(out), indent=2))
        return
    _print(out, work.description)


def _tenants(cfg: PolicyConfig, names: list[str], name: str, fleet: str | None, seed: int, duration: float,
             options: SimOptions, as_json: bool) -> None:
    from cli.simulate_tenants import print_variants, run_variants

    scenario = TENANT_SCENARIOS[name]
    sizes = parse_fleet(fleet, cfg) if fleet else {p: dict(scenario.fleet).get(p, 0) for p in cfg.pools}

    def make(router: str, variant: PolicyConfig) -> Router:
        return believing(variant, options, sizes) if router == TRUE_PROFILE else ROUTERS[router](variant)

    runs = run_variants(cfg, names, make, scenario, sizes, seed, duration, options)
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(runs), indent=2))
    else:
        print_variants(runs, scenario)


def _print(runs: list[dict[str, Any]], description: str) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    first = runs[0]
    fleet = ", ".join(f"{p}={n}" for p, n in first["fleet"].items())
    scenario = f", scenario {first['scenario']}" if first["scenario"] else ""
    table = Table(title=f"{first['workload']} at {first['rate']:.1f} jobs/s for {first['duration']:.0f} s, "
                        f"fleet {fleet}, seed {first['seed']}{scenario}", header_style="bold", padding=(0, 1),
                  box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True,
                  caption=f"{description}. met: share of all the class's jobs that met the SLO (green: "
                          "attainment target met); admitted: of those not shed; shed/fail: jobs refused by "
                          "admission / failed or unfinished; TTFT from submission (--json adds e2e); $/Mtok: "
                          "provisioned fleet cost per million output tokens; accel: share served by accelerators.")
    # The policy heads its rows rather than taking a column, and goodput goes below: the
    # table fits 80 columns (the width of a pipe) without cutting a number.
    table.add_column("policy, class", no_wrap=True)
    for col in COLUMNS[1:]:
        table.add_column(col, justify="right", no_wrap=True)
    for run in runs:
        table.add_row(f"[bold]{run['policy']}[/]")
        for row in table_rows(run["classes"]):
            table.add_row(f"  {row[0]}", *row[1:], style="bold" if row[0] == "all" else None)
        table.add_section()
    console = Console()
    console.print(table)
    if first["scenario"]:
        console.print(f"\n[bold]scenario {first['scenario']}[/]: {SCENARIOS[first['scenario']].description}")
    dead = [(run["policy"], run["routed_to_dead_pool"]) for run in runs if "routed_to_dead_pool" in run]
    if dead:
        console.print("jobs routed to a pool with no live worker after its heartbeats ran out: "
                      + ", ".join(f"{name} {n}" for name, n in dead))
    goodputs: list[tuple[str, Goodput]] = [(run["policy"], run["goodput"]) for run in runs if "goodput" in run]
    if goodputs:
        console.print("\n[bold]goodput[/]: the highest arrival rate at which the class still met its target "
                      "(+: at least that; the highest rate tried still met it)")
        for name, g in goodputs:
            console.print(f"  {name:<16} {g.cls:<12} {g.rate:8.1f}{'+' if g.capped else ' '} jobs/s")


simulate = simulate_cmd
"""The command object to register: ``main.add_command(simulate)``."""
