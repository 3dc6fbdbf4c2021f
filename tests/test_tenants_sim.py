"""Tenants in the simulator: a flooding tenant does not push a well-behaved one's attainment down.

Pure and fast: the noisy-neighbour scenario (``evaluation.tenancy``) on a virtual clock, 20 s
of arrivals per variant.
"""

from __future__ import annotations

import json

import msgspec
from click.testing import CliRunner

from broker.config import load_config
from cli.main import main
from evaluation.records import SimResult
from evaluation.simulator import simulate
from evaluation.tenancy import TENANT_SCENARIOS, TenantMetrics, by_tenant, within
from evaluation.workloads import Arrival
from policies.config import TenantSpec
from policies.route import JobFeatures
from policies.slo import SloRouter

BASE = load_config()
SCENARIO = TENANT_SCENARIOS["noisy-neighbour"]
FLEET = dict(SCENARIO.fleet)
DURATION = 20.0


def run(variant: str, seed: int = 1) -> SimResult:
    cfg = SCENARIO.config(BASE, variant)
    return simulate(cfg, SloRouter(cfg), SCENARIO.arrivals(seed, DURATION, variant), FLEET, seed, DURATION)


def tenants(variant: str, seed: int = 1) -> dict[str, TenantMetrics]:
    return by_tenant(run(variant, seed))


def test_the_quiet_tenant_keeps_its_attainment_beside_a_flood_held_to_its_quota() -> None:
    for seed in (1, 2):
        alone, both, none = tenants("alone", seed), tenants("quotas", seed), tenants("none", seed)
        acme, bulk = both["acme"], both["bulk"]
        assert set(alone) == {"acme"} and alone["acme"].jobs == acme.jobs  # the same jobs of acme
        assert alone["acme"].attainment >= 0.95
        assert within(alone["acme"], acme), (alone["acme"].attainment, acme.attainment)
        assert acme.quota == 0  # within its quota: never refused for it
        # bulk offers 10x its 8 jobs/s: held near its quota (plus the bucket's 2 s), refused by quota.
        admitted = bulk.jobs - bulk.rejected
        assert admitted <= 8 * (DURATION + 2) + 1 and bulk.quota > 0.8 * bulk.jobs
        # Without tenants the same flood costs acme many points: the test measures something.
        assert none["acme"].attainment < alone["acme"].attainment - 0.1


def test_quota_refusals_carry_a_reason_and_a_retry_after() -> None:
    result = run("quotas")
    refused = [r for r in result.records if r.tenant == "bulk" and r.status == "rejected"]
    assert refused
    for rec in refused:
        assert rec.reason.startswith("quota: tenant bulk over "), rec.reason
        assert rec.retry_after_s is not None and 0 < rec.retry_after_s <= 60, rec
    # Mostly the jobs/s bucket; it refills one job every 1/8 s.
    assert max(r.retry_after_s or 0 for r in refused if "jobs/s" in r.reason) <= 0.125 + 1e-9


def test_fair_share_alone_holds_the_flood_back_while_the_pool_is_full() -> None:
    fair, none = tenants("fair-share"), tenants("none")
    assert fair["bulk"].fair_share > 0 and fair["bulk"].quota == 0
    assert fair["acme"].fair_share == 0  # the least served is never held back
    assert fair["acme"].attainment > none["acme"].attainment + 0.1
    refused = [r for r in run("fair-share").records if r.reason.startswith("fair share:")]
    assert all(r.retry_after_s is not None and r.retry_after_s > 0 for r in refused)


def test_finished_jobs_free_their_concurrent_slots_in_the_simulator() -> None:
    cfg = msgspec.structs.replace(BASE, tenants={"acme": TenantSpec(concurrent=2)})
    job = JobFeatures(tenant="acme", model="llama-3.1-8b", kind="chat", prompt_tokens=500, max_tokens=50,
                      slo_hint="interactive")
    # Three at once: the third refused; two more after the first two have finished: both run.
    arrivals = [Arrival(0.0, job, "interactive")] * 3 + [Arrival(5.0, job, "interactive")] * 2
    result = simulate(cfg, SloRouter(cfg), arrivals, FLEET, 1, 6.0)
    assert [r.status for r in result.records] == ["ok", "ok", "rejected", "ok", "ok"]
    assert result.records[2].reason == "quota: tenant acme at its 2 concurrent jobs"


def test_simulate_runs_the_tenants_scenario() -> None:
    res = CliRunner().invoke(main, ["simulate", "--scenario", "noisy-neighbour", "--policy", "slo", "--duration",
                                    "5", "--json"])
    assert res.exit_code == 0, res.output
    runs = json.loads(res.output)
    assert [r["variant"] for r in runs] == ["alone", "quotas", "fair-share", "none"]
    assert set(runs[1]["tenants"]) == {"acme", "bulk"} and runs[1]["tenants"]["bulk"]["quota"] > 0
    table = CliRunner().invoke(main, ["simulate", "--scenario", "noisy-neighbour", "--policy", "slo", "--duration",
                                      "5"], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    assert max(map(len, table.output.splitlines())) <= 80 and "…" not in table.output
    assert "slo: acme" in table.output and "3 points" in table.output


def test_the_bench_script_reports_each_variant_and_the_verdict() -> None:
    from bench.tenants import QUICK_DURATION, QUICK_SEEDS, findings, measure, section

    runs = measure(QUICK_SEEDS, QUICK_DURATION)
    text = section(runs, QUICK_SEEDS, QUICK_DURATION)
    for variant in ("alone", "quotas", "fair-share", "none"):
        assert sum(line.startswith(f"| {variant} |") for line in text.splitlines()) == 2, variant
    assert all("(within 3)" in line and "all carry a retry-after" in line for line in findings(runs))
