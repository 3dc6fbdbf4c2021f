"""The tenants' ledger (``policies.tenants``): quotas, retry hints, concurrency, the token-fair share.

All pure: time is an argument, so every test steps a virtual clock.
"""

from __future__ import annotations

import tomllib

import pytest

from broker.config import default_config_text
from broker.decider import Decider, make_router
from policies.config import ConfigError, PolicyConfig, TenantSpec, config_from_dict
from policies.route import JobFeatures, PoolState, Snapshot
from policies.tenants import ALLOWANCE, FORGET_S, MAX_OUTSTANDING, TenantLedger


def config(extra: str) -> PolicyConfig:
    return config_from_dict(tomllib.loads(default_config_text() + "\n" + extra))


def test_tenants_tables_parse_with_defaults_and_errors_name_the_key() -> None:
    cfg = config('[tenants.acme]\nweight = 2\njobs_per_s = 20\n\n[tenants.bulk]\ntokens_per_min = 60000\n'
                 'concurrent = 4\nburst_s = 1\n')
    assert cfg.tenants == {"acme": TenantSpec(weight=2.0, jobs_per_s=20.0),
                           "bulk": TenantSpec(tokens_per_min=60000.0, concurrent=4, burst_s=1.0)}
    assert config("").tenants == {}
    for extra, message in [
        ("[tenants.default]", "tenants.default: 'default' is not a tenant name"),
        ('[tenants."a.b"]', "is not a tenant name: 1-32 characters"),
        (f"[tenants.{'x' * 33}]", "is not a tenant name"),
        ("[tenants.a]\nweight = 0", "tenants.a.weight must be a positive number"),
        ("[tenants.a]\njobs_per_s = -1", "tenants.a.jobs_per_s must be a positive number"),
        ("[tenants.a]\nburst_s = 0", "tenants.a.burst_s must be a positive number"),
        ("[tenants.a]\nconcurrent = 0", "tenants.a.concurrent must be at least 1"),
        ("[tenants.a]\nrate = 1", "unknown field `rate` - at `$.tenants.a`"),
        ('[tenants.a]\nweight = "heavy"', "at `$.tenants.a.weight`"),
    ]:
        with pytest.raises(ConfigError) as err:
            config(extra)
        assert message in str(err.value), (extra, str(err.value))


def test_jobs_per_second_bucket_refuses_with_when_it_will_hold_the_job() -> None:
    ledger = TenantLedger({"acme": TenantSpec(jobs_per_s=10, burst_s=1)})
    t = 100.0
    got = [ledger.admit("acme", f"j{i}", 10, t, contended=False) for i in range(11)]
    assert all(a.admitted for a in got[:10])  # a full bucket: burst_s x rate at once
    refused = got[10]
    assert not refused.admitted and refused.reason == "quota: tenant acme over 10 jobs/s"
    assert refused.retry_after_s == pytest.approx(0.1)  # one job of rate 10/s
    assert not ledger.admit("acme", "k", 10, t + 0.05, contended=False).admitted
    assert ledger.admit("acme", "k", 10, t + 0.1, contended=False).admitted
    # A refusal leaves no trace: the bucket is as empty as before it.
    assert ledger.admit("acme", "late", 10, t + 0.1, contended=False).retry_after_s == pytest.approx(0.1)


def test_tokens_per_minute_counts_prompt_and_max_tokens_and_lets_a_big_job_drain_a_full_bucket() -> None:
    ledger = TenantLedger({"acme": TenantSpec(tokens_per_min=6000, burst_s=2)})  # 100/s, 200 deep
    t = 0.0
    assert ledger.admit("acme", "a", 150, t, contended=False).admitted
    refused = ledger.admit("acme", "b", 100, t, contended=False)
    assert not refused.admitted and refused.reason == "quota: tenant acme over 6000 tokens/min (this job counts 100)"
    assert refused.retry_after_s == pytest.approx(0.5)  # 50 left, 100 needed, 100 per second
    # A job bigger than the bucket waits for a full bucket, then runs it into debt.
    big = ledger.admit("acme", "c", 1000, t, contended=False)
    assert big.retry_after_s == pytest.approx(1.5)
    assert ledger.admit("acme", "c", 1000, t + 1.5, contended=False).admitted
    assert ledger.admit("acme", "d", 1, t + 1.5 + 7.9, contended=False).retry_after_s == pytest.approx(0.11)


def test_concurrent_jobs_free_on_finished_and_redelivery_is_not_counted_twice() -> None:
    ledger = TenantLedger({"acme": TenantSpec(concurrent=2)})
    assert ledger.admit("acme", "a", 1, 0, contended=False).admitted
    assert ledger.admit("acme", "a", 1, 0, contended=False).admitted  # the same id again: a no-op
    assert ledger.admit("acme", "b", 1, 0, contended=False).admitted
    third = ledger.admit("acme", "c", 1, 0, contended=False)
    assert not third.admitted and third.reason == "quota: tenant acme at its 2 concurrent jobs"
    assert third.retry_after_s is not None and third.retry_after_s > 0
    assert ledger.outstanding("acme") == ["a", "b"]
    assert ledger.finished("acme", "a") and not ledger.finished("acme", "a")
    assert ledger.admit("acme", "c", 1, 0, contended=False).admitted
    assert ledger.outstanding("acme") == ["b", "c"]


def test_unlisted_tenants_are_unlimited_and_share_scales_each_limit() -> None:
    ledger = TenantLedger({"acme": TenantSpec(jobs_per_s=10, burst_s=1)}, share=0.5)
    assert all(ledger.admit(t, f"{t}{i}", 10**6, 0, contended=True).admitted
               for t in ("default", "other") for i in range(1000))
    assert ledger.tenants() == []
    got = [ledger.admit("acme", f"j{i}", 1, 0, contended=False) for i in range(6)]
    assert [a.admitted for a in got] == [True] * 5 + [False]
    assert got[5].reason == "quota: tenant acme over 10 jobs/s (5 at this worker's share 0.5)"
    assert got[5].retry_after_s == pytest.approx(0.2)
    half = TenantLedger({"acme": TenantSpec(concurrent=5)}, share=0.5)
    assert [half.admit("acme", f"j{i}", 1, 0, contended=False).admitted for i in range(3)] == [True, True, False]
    with pytest.raises(ValueError):
        TenantLedger({}, share=0)


def serve(ledger: TenantLedger, weights: dict[str, float], rounds: int, *, offered: int = 3,
          slots: int = 8, size: int = 500) -> dict[str, int]:
    """A pool of ``slots`` running jobs for 20 steps each, first come first served, and
    tenants offering ``offered`` jobs a step each; the tokens each got served."""
    served = dict.fromkeys(weights, 0)
    running: list[tuple[int, str, str]] = []
    queue: list[tuple[str, str]] = []
    for step in range(rounds):
        for _, tenant, job in [r for r in running if r[0] <= step]:
            ledger.finished(tenant, job)
            served[tenant] += size
        running = [r for r in running if r[0] > step]
        while queue and len(running) < slots:
            tenant, job = queue.pop(0)
            running.append((step + 20, tenant, job))
        order = list(weights) if step % 2 else list(weights)[::-1]
        for i in range(offered):
            for tenant in order:
                job = f"{tenant}-{step}-{i}"
                busy = len(running) + len(queue) >= slots
                if ledger.admit(tenant, job, size, step * 0.01, contended=busy).admitted:
                    queue.append((tenant, job))
                    while queue and len(running) < slots:
                        running.append((step + 20, *queue.pop(0)))
    return served


def test_weights_two_to_one_share_a_contended_lane_two_to_one_in_tokens() -> None:
    weights = {"gold": 2.0, "iron": 1.0}
    ledger = TenantLedger({t: TenantSpec(weight=w) for t, w in weights.items()})
    served = serve(ledger, weights, 4000)
    assert served["gold"] / served["iron"] == pytest.approx(2.0, rel=0.05), served
    # Without the ledger's weights (equal ones) the same pool splits evenly.
    even = serve(TenantLedger({t: TenantSpec() for t in weights}), weights, 4000)
    assert even["gold"] / even["iron"] == pytest.approx(1.0, rel=0.05), even
    # Room for every job (not contended): each is admitted, whatever the counters say.
    free = serve(TenantLedger({t: TenantSpec(weight=w) for t, w in weights.items()}), weights, 300, slots=200)
    assert free["gold"] == free["iron"] == (300 - 20) * 3 * 500


def test_fair_share_refusal_says_why_and_when() -> None:
    ledger = TenantLedger({"a": TenantSpec(), "b": TenantSpec()})
    assert ledger.admit("a", "a0", 100, 0, contended=False).admitted
    n = 0
    while ledger.admit("b", f"b{n}", 1000, 0.1 * n, contended=True).admitted:
        n += 1
    refused = ledger.admit("b", "bx", 1000, 0.1 * n, contended=True)
    assert n > ALLOWANCE / 1000 and not refused.admitted
    assert refused.reason.startswith("fair share: tenant b is ") and "ahead of a (weights 1:1)" in refused.reason
    assert refused.retry_after_s is not None and refused.retry_after_s > 0
    # The same lead on an uncontended pool is admitted: the share decides only who waits.
    assert ledger.admit("b", "bx", 1000, 0.1 * n, contended=False).admitted
    # Another lane has counters of its own.
    assert ledger.admit("b", "by", 1000, 0.1 * n, contended=True, lane=1).admitted


def test_a_tenant_returning_from_idle_is_lifted_and_banks_no_credit() -> None:
    ledger = TenantLedger({"a": TenantSpec(), "b": TenantSpec()})
    assert ledger.admit("a", "a0", 10, 0, contended=True).admitted
    ledger.finished("a", "a0")  # a goes idle
    for i in range(100):  # b alone for a long while: every job runs
        assert ledger.admit("b", f"b{i}", 1000, 1 + i * 0.01, contended=True).admitted
    # a comes back: lifted to b's counter, so b is not locked out while a "catches up" on
    # the 100,000 tokens it did not ask for; each takes its turn.
    turns = []
    for i in range(40):
        now = 3 + i * 0.01
        for tenant in ("a", "b"):
            if ledger.admit(tenant, f"{tenant}-r{i}", 1000, now, contended=True).admitted:
                turns.append(tenant)
    assert abs(turns.count("a") - turns.count("b")) <= ALLOWANCE / 1000 + 1, turns


def test_idle_tenants_are_forgotten_and_outstanding_ids_are_bounded() -> None:
    specs = {f"t{i}": TenantSpec(jobs_per_s=100) for i in range(50)}
    ledger = TenantLedger(specs)
    for i in range(50):
        assert ledger.admit(f"t{i}", "j", 10, 0, contended=False).admitted
        ledger.finished(f"t{i}", "j")
    assert len(ledger.tenants()) == 50
    ledger.admit("t0", "k", 10, FORGET_S + 1, contended=False)
    assert ledger.tenants() == ["t0"]
    busy = TenantLedger({"acme": TenantSpec()})
    for i in range(MAX_OUTSTANDING + 10):  # never told that any finished
        busy.admit("acme", f"j{i}", 1, 0, contended=False)
    ids = busy.outstanding("acme")
    assert len(ids) == MAX_OUTSTANDING and ids[0] == "j10"


def test_the_decider_admits_after_routing_with_contention_from_its_snapshot() -> None:
    cfg = config("[tenants.a]\n\n[tenants.b]\nconcurrent = 1\n")
    decider = Decider(cfg, make_router(cfg), "seed", 0.0)
    job = JobFeatures(tenant="b", model="llama-3.1-8b", kind="chat", prompt_tokens=900, max_tokens=100)
    assert decider.admit(job, "j1", "gpu", 0, 0.0).admitted
    refused = decider.admit(job, "j2", "gpu", 0, 0.0)
    assert not refused.admitted and refused.reason == "quota: tenant b at its 1 concurrent jobs"
    assert decider.finished("b", "j1") and decider.admit(job, "j2", "gpu", 0, 0.0).admitted
    # b is now far ahead of a in the lane; a full pool refuses it, an idle one does not.
    a = JobFeatures(tenant="a", model="llama-3.1-8b", kind="chat", prompt_tokens=1, max_tokens=1)
    assert decider.admit(a, "a1", "gpu", 0, 0.0).admitted
    decider.finished("b", "j2")
    for i in range(10):
        decider.admit(job, f"b{i}", "gpu", 0, 0.0)
        decider.finished("b", f"b{i}")
    decider.use(Snapshot(now=1.0, pools={"gpu": PoolState(backlog=64, workers=1, capacity=64)}))
    full = decider.admit(job, "late", "gpu", 0, 1.0)
    assert not full.admitted and full.reason.startswith("fair share: tenant b"), full
    decider.use(Snapshot(now=1.0, pools={"gpu": PoolState(backlog=10, workers=1, capacity=64)}))
    assert decider.admit(job, "late", "gpu", 0, 1.0).admitted
