"""The SLO-aware router, its estimator and the baselines: decision tables, learning, properties.

All pure: no Redis, no clock. The figures come from the default config (``broker/default.toml``:
gpu = one H100 at $3/h x 64 slots, accel = $20/h x 8 slots, interactive 500 ms TTFT / 40 ms
TPOT) and the device profiles, with the default safety margin 0.8.
"""

from __future__ import annotations

import math
import random
import tomllib
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import default_config_text, load_config
from evaluation.baselines import (
    ROUTERS,
    AccelOnly,
    CheapestFirst,
    GpuOnly,
    JoinShortestQueue,
    LowestObservedLatency,
    OracleRouter,
    OracleTruth,
    RoundRobin,
)
from policies import PROFILES, JobFeatures, PolicyConfig, PoolState, Snapshot, config_from_dict
from policies.config import EVALUATION_ROUTERS, JOB_KINDS, LIVE_ROUTERS, ConfigError
from policies.estimate import LatencyEstimator, Prediction, bucket, job_cost
from policies.router import Observation
from policies.slo import SloRouter, misses

DEFAULT = load_config()
DEFAULT_DICT = tomllib.loads(default_config_text())
RAW: dict[str, Any] = tomllib.loads(default_config_text())
H100_8B = PROFILES["h100"].models["llama-3.1-8b"]
H100_70B = PROFILES["h100"].models["llama-3.3-70b"]
M8, M70 = "llama-3.1-8b", "llama-3.3-70b"
BEST_EFFORT = {name: {**cls, "on_unattainable": "best_effort"} for name, cls in RAW["classes"].items()}
"""The default classes with admission off."""


def job(**kw: Any) -> JobFeatures:
    base: dict[str, Any] = dict(tenant="t", model=M8, kind="chat", prompt_tokens=100, max_tokens=64)
    base.update(kw)
    return JobFeatures(**base)


def snap(now: float = 1000.0, **backlogs: int) -> Snapshot:
    return Snapshot(now=now, pools={n: PoolState(backlog=b, workers=1) for n, b in backlogs.items()})


def config(**changes: Any) -> PolicyConfig:
    """The default config with top-level tables merged in (``classes={"x": {...}}`` adds a class)."""
    data = msgspec.json.decode(msgspec.json.encode(RAW))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return config_from_dict(data)


def decide(router: Any, j: JobFeatures, slo: str, s: Snapshot, seed: int = 0) -> Any:
    return router.decide(j, slo, s, random.Random(seed))


def obs(pool: str, model: str, *, c: int = 1, ttft: float, tpot: float | None, at: float = 0.0,
        prompt: int = 1000, out: int = 100) -> Observation:
    return Observation(pool=pool, model=model, prompt_tokens=prompt, output_tokens=out, concurrency=c,
                       ttft_ms=ttft, tpot_ms=tpot, at=at)


R = TypeVar("R", bound=SloRouter)


def warm(router: R, *pools: str) -> R:
    """``router`` once ``pools`` (default: gpu and accel) have each reported one finished 8B job
    that took what the profile predicts, so that it may refuse jobs there (before, it refuses
    nothing). The factors stay 1; the job's service time becomes the pool's mean."""
    for pool in pools or ("gpu", "accel"):
        profile = PROFILES[router.config.pools[pool].profile].models[M8]
        router.observe(obs(pool, M8, ttft=profile.ttft(1000, 1), tpot=profile.itl(1)))
    return router


# --------------------------------------------------------------------------- decision tables


def test_8b_interactive_on_an_idle_h100_stays_on_gpu_because_it_is_cheaper() -> None:
    router = SloRouter(DEFAULT)
    s = snap(gpu=0, accel=0)
    gpu, accel = router.predict(job(), "gpu", s), router.predict(job(), "accel", s)
    assert gpu is not None and accel is not None
    interactive = DEFAULT.classes["interactive"]
    assert not misses(interactive, gpu, 0.8) and not misses(interactive, accel, 0.8)  # both meet
    assert gpu.cost < accel.cost
    d = decide(router, job(), "interactive", s)
    assert d.pool == "gpu" and not d.shed
    assert d.predicted_ttft_ms == pytest.approx(H100_8B.ttft(100, 1))
    assert d.predicted_e2e_ms == pytest.approx(H100_8B.service_ms(100, 64, 1))
    assert "meets" in d.reason and "cheapest" in d.reason


def test_70b_interactive_moves_to_accel_when_gpu_load_breaks_the_tpot_target() -> None:
    router = SloRouter(DEFAULT)
    # Idle H100: ITL 18.6 ms <= 0.8 x 40 ms, and the GPU is cheaper.
    assert decide(router, job(model=M70), "interactive", snap(gpu=0, accel=0)).pool == "gpu"
    # 40 jobs ahead on one worker: ITL at c=41 is about 52 ms, over 32.
    d = decide(router, job(model=M70), "interactive", snap(gpu=40, accel=0))
    assert d.pool == "accel"
    assert "gpu misses tpot" in d.reason


def test_a_saturated_gpu_is_avoided() -> None:
    d = decide(SloRouter(DEFAULT), job(), "interactive", snap(gpu=200, accel=0))
    assert d.pool == "accel"
    assert "gpu misses ttft" in d.reason


def test_a_saturated_accelerator_is_avoided() -> None:
    router = SloRouter(DEFAULT)
    long70 = job(model=M70, max_tokens=512)
    # 512 tokens of 70B: the accelerator is cheaper even against an idle GPU...
    assert decide(router, long70, "interactive", snap(gpu=0, accel=0)).pool == "accel"
    # ...until its 8 slots are taken and the job would queue past the TTFT target.
    d = decide(router, long70, "interactive", snap(gpu=0, accel=8))
    assert d.pool == "gpu"
    assert "accel misses ttft" in d.reason


def test_a_pool_whose_endpoints_all_cool_down_is_avoided_until_they_are_back() -> None:
    router = SloRouter(DEFAULT)
    long70 = job(model=M70, max_tokens=512)  # the accelerator's job when it can take it
    cooling = Snapshot(now=1000.0, pools={"gpu": PoolState(workers=1),
                                          "accel": PoolState(workers=1, cooling_until=1002.5)})
    d = decide(router, long70, "interactive", cooling)
    assert d.pool == "gpu" and "accel cooling down for 2.5 s" in d.reason
    back = msgspec.structs.replace(cooling, now=1003.0)
    assert decide(router, long70, "interactive", back).pool == "accel"


def test_with_no_live_worker_anywhere_the_job_waits_on_the_default_pool() -> None:
    long70 = job(model=M70, max_tokens=512)  # the accelerator's job when it is staffed
    down = Snapshot(now=1000.0, pools={"gpu": PoolState(), "accel": PoolState()})
    d = decide(SloRouter(DEFAULT), long70, "interactive", down)
    assert d.pool == "gpu" and "no pool has live workers" in d.reason


def test_spill_over_from_a_saturated_pool_that_would_still_meet() -> None:
    router = SloRouter(DEFAULT)
    s = snap(gpu=70, accel=0)  # six jobs queued beyond the GPU's 64 slots
    gpu = router.predict(job(), "gpu", s)
    assert gpu is not None and gpu.queue_wait_ms > 0
    assert not misses(DEFAULT.classes["interactive"], gpu, 0.8)  # it would still meet, and is cheaper
    d = decide(router, job(), "interactive", s)
    assert d.pool == "accel"
    assert "spill from saturated gpu" in d.reason


def test_a_model_the_accelerator_lacks_goes_to_gpu() -> None:
    for name, make in ROUTERS.items():
        d = decide(make(DEFAULT), job(model="minilm-l6", kind="embedding"), "interactive", snap(gpu=500, accel=0))
        assert d.pool == "gpu", name


def test_a_70b_only_gpu_fleet_runs_best_effort_on_gpu() -> None:
    cfg = config(pools={"accel": {**RAW["pools"]["accel"], "models": [M8]}})
    d = decide(SloRouter(cfg), job(model=M70), "interactive", snap(gpu=40, accel=0))
    assert d.pool == "gpu" and not d.shed
    assert "best effort" in d.reason


def test_no_pool_serves_an_unknown_model_or_kind() -> None:
    embeddings_only = config(pools={"gpu": {**RAW["pools"]["gpu"], "kinds": ["embedding"]}})
    cases = [(DEFAULT, job(model="no-such-model")), (embeddings_only, job(model="minilm-l6", kind="completion"))]
    for name, make in ROUTERS.items():
        for cfg, j in cases:
            d = decide(make(cfg), j, "interactive", snap())
            assert d.pool is None and not d.shed, name
            assert d.reason.startswith("no pool serves"), (name, d.reason)


STRICT = {"ttft_ms": 1}
"""A TTFT target no device meets (admission left at its default)."""


def test_admission_is_on_by_default() -> None:
    assert {cls.on_unattainable for cls in DEFAULT.classes.values()} == {"shed"}
    assert config(classes={"x": {"ttft_ms": 1}}).classes["x"].on_unattainable == "shed"
    # The default config as shipped: an interactive job that would queue on every pool is refused.
    d = decide(warm(SloRouter(DEFAULT)), job(), "interactive", snap(gpu=2000, accel=100))
    assert d.shed and d.pool is None and d.retry_after_s is not None


def test_a_shed_class_is_shed_with_reason_slo_unattainable() -> None:
    cfg = config(classes={"strict": STRICT})
    d = decide(warm(SloRouter(cfg)), job(), "strict", snap(gpu=0, accel=0))
    assert d.shed and d.pool is None
    assert d.reason.startswith("slo_unattainable: ")
    assert "gpu misses ttft" in d.reason and "accel misses ttft" in d.reason
    assert d.predicted_ttft_ms == pytest.approx(H100_8B.ttft(100, 1))  # the best there was


def test_admission_sheds_only_past_the_shed_margin() -> None:
    # The best prediction (idle H100: ttft(100, 1)) against targets that put it inside the
    # safety margin's miss but within the target itself (too close to call: best effort), and
    # past the target (refused: no device meets it, so no retry hint).
    best = H100_8B.ttft(100, 1)
    close = config(classes={"x": {"ttft_ms": best / 0.9}})
    d = decide(warm(SloRouter(close)), job(), "x", snap(gpu=0, accel=0))
    assert d.pool == "gpu" and not d.shed and "best effort" in d.reason
    far = config(classes={"x": {"ttft_ms": best / 2}})
    d = decide(warm(SloRouter(far)), job(), "x", snap(gpu=0, accel=0))
    assert d.shed and d.pool is None and d.retry_after_s is None
    assert d.reason.startswith("slo_unattainable: no pool can serve x in time: best gpu ttft ")
    assert "even on an idle pool" in d.reason and "accel misses ttft" in d.reason
    loose = config(classes={"x": {"ttft_ms": best / 2}}, routing={"policy": "slo", "shed_margin": 2.5})
    assert not decide(warm(SloRouter(loose)), job(), "x", snap(gpu=0, accel=0)).shed


def test_a_job_that_would_queue_everywhere_is_refused_with_the_time_to_drain() -> None:
    cfg = config(pools={"accel": {**RAW["pools"]["accel"], "models": [M70]}})
    router = warm(SloRouter(cfg))
    s = snap(gpu=2000, accel=0)
    d = decide(router, job(), "interactive", s)
    pred = router.predict(job(), "gpu", s, cfg.lane("interactive"))
    assert pred is not None and pred.ttft_ms > 10_000
    assert d.shed and d.retry_after_s == math.ceil((pred.ttft_ms - 500) / 1000)
    assert f"retry after {d.retry_after_s:.0f} s" in d.reason


def test_a_job_that_misses_everywhere_at_the_load_it_would_join_is_refused() -> None:
    # 70B interactive on GPUs running 60 of 64 jobs (the accelerator serves only 8B here): a
    # slot is free, so it adds no queue, and an idle GPU would meet 500 ms, but prefill at the
    # load it would join (61 jobs) takes about 664 ms. Running it would only slow the jobs
    # beside it for a miss: refused, with the time for the load to fall by the excess.
    cfg = config(pools={"accel": {**RAW["pools"]["accel"], "models": [M8]}})
    router = warm(SloRouter(cfg))
    s = snap(gpu=60, accel=0)
    for prompt, retry in ((100, 1), (5000, 3)):  # 664 ms (at least 1 s), then 3,320 ms
        j = job(model=M70, prompt_tokens=prompt)
        pred = router.predict(j, "gpu", s, 0)
        assert pred is not None and pred.queue_wait_ms == 0
        assert pred.ttft_ms == pytest.approx(H100_70B.ttft(prompt, 61)) and pred.ttft_ms > 500
        d = decide(router, j, "interactive", s)
        assert d.shed and d.pool is None and d.retry_after_s == retry == max(1, math.ceil((pred.ttft_ms - 500) / 1000))
        assert d.reason.startswith("slo_unattainable: no pool can serve interactive in time: best gpu ttft ")
        assert f"at the load it would join; retry after {retry} s" in d.reason
    # At a lighter load it meets the TTFT target (only the TPOT misses, no reason to refuse).
    d = decide(router, job(model=M70), "interactive", snap(gpu=40, accel=0))
    assert d.pool == "gpu" and not d.shed and "best effort" in d.reason
    # With admission off it runs however loaded the pool.
    off = config(pools={"accel": {**RAW["pools"]["accel"], "models": [M8]}}, classes=BEST_EFFORT)
    d = decide(warm(SloRouter(off)), job(model=M70), "interactive", s)
    assert d.pool == "gpu" and not d.shed and "best effort" in d.reason


def test_cold_start_refuses_nothing() -> None:
    # Every pool saturated, and a target no device meets: a router whose pools have reported
    # no finished job refuses neither (its predictions are the profiles' guesses)...
    cfg = config(classes={"strict": STRICT})
    router = SloRouter(cfg)
    cases = [("interactive", snap(gpu=2000, accel=100)), ("strict", snap(gpu=0, accel=0))]
    for slo, s in cases:
        d = decide(router, job(), slo, s)
        assert not d.shed and d.pool is not None and "best effort" in d.reason
        assert "not refused: gpu, accel finished no job yet (profile guesses)" in d.reason
    # ...and refuses both once each pool has finished one.
    warm(router)
    assert all(decide(router, job(), slo, s).shed for slo, s in cases)


def test_a_pool_that_has_finished_no_job_refuses_nothing_queued_on_it() -> None:
    s = snap(gpu=2000, accel=100)  # an interactive 8B job would queue on both
    for seen, unseen in (("gpu", "accel"), ("accel", "gpu")):  # accel is the best pool (shorter wait)
        router = warm(SloRouter(DEFAULT), seen)
        d = decide(router, job(), "interactive", s)
        assert not d.shed and d.pool is not None
        assert f"not refused: {unseen} finished no job yet (profile guesses)" in d.reason
        assert decide(warm(router, unseen), job(), "interactive", s).shed
    # A pool that cannot run the job (the accelerator serves 8B only here) is no reason to admit it.
    cfg = config(pools={"accel": {**RAW["pools"]["accel"], "models": [M8]}})
    d = decide(warm(SloRouter(cfg), "gpu"), job(model=M70), "interactive", s)
    assert d.shed and "not refused" not in d.reason


def test_nothing_is_shed_while_no_pool_has_a_live_worker() -> None:
    cfg = config(classes={"strict": STRICT})
    cold = Snapshot(now=1000.0, pools={n: PoolState(backlog=5000, workers=0) for n in ("gpu", "accel")})
    d = decide(warm(SloRouter(cfg)), job(), "strict", cold)
    assert d.pool == "gpu" and not d.shed


def test_a_shed_margin_under_the_safety_margin_is_refused() -> None:
    with pytest.raises(ConfigError, match="shed_margin"):
        config(routing={"policy": "slo", "safety_margin": 0.8, "shed_margin": 0.5})


def test_a_best_effort_class_runs_on_the_lowest_predicted_ttft() -> None:
    cfg = config(classes={"strict": {**STRICT, "on_unattainable": "best_effort"}})
    d = decide(SloRouter(cfg), job(), "strict", snap(gpu=0, accel=0))
    assert not d.shed and d.pool == "gpu"  # 2 ms on the H100 against 96 ms on the accelerator
    assert "best effort" in d.reason
    d = decide(SloRouter(cfg), job(), "strict", snap(gpu=300, accel=0))
    assert d.pool == "accel"


def test_an_e2e_target_counts() -> None:
    cfg = config(classes={"quick": {"ttft_ms": 500, "e2e_ms": 200}})
    # 64 tokens: GPU e2e about 292 ms (over 160), accelerator about 131 ms.
    d = decide(SloRouter(cfg), job(), "quick", snap(gpu=0, accel=0))
    assert d.pool == "accel"
    assert "gpu misses e2e" in d.reason


def test_the_safety_margin_counts() -> None:
    # 70B at c=1: ITL 18.6 ms. A 22 ms TPOT target meets at margin 0.9 (19.8) but not at 0.8 (17.6).
    classes = {"tight": {"ttft_ms": 500, "tpot_ms": 22}}
    loose = config(classes=classes, routing={"policy": "slo", "safety_margin": 0.9})
    tight = config(classes=classes, routing={"policy": "slo", "safety_margin": 0.8})
    j = job(model=M70, max_tokens=32)
    assert decide(SloRouter(loose), j, "tight", snap(gpu=0, accel=0)).pool == "gpu"
    assert decide(SloRouter(tight), j, "tight", snap(gpu=0, accel=0)).pool == "accel"


def test_unknown_class_uses_the_default_class_and_says_so() -> None:
    d = decide(SloRouter(DEFAULT), job(), "no-such-class", snap())
    assert d.pool == "gpu"
    assert "unknown class 'no-such-class'" in d.reason


def lanes(running: int, *queued: int) -> PoolState:
    """One worker with ``running`` jobs in flight and ``queued`` waiting by lane (0 = interactive)."""
    return PoolState(backlog=running + sum(queued), queued=queued, workers=1, in_flight=running)


def test_a_job_waits_only_behind_running_work_and_its_own_and_more_urgent_lanes() -> None:
    state = lanes(64, 3, 5, 500)
    assert (state.ahead(0), state.ahead(1), state.ahead(2)) == (67, 72, 572)
    assert state.ahead(None) == 572 == PoolState(backlog=572).ahead(0)  # not known by lane: all of it
    est = LatencyEstimator(DEFAULT)
    inter, batch = (est.predict(job(), "gpu", state, 0.0, lane=lane) for lane in (0, 2))
    assert inter is not None and batch is not None
    # Itself and the jobs ahead, beyond the 64 slots: 4 for interactive work, 509 for batch work.
    assert batch.queue_wait_ms == pytest.approx(inter.queue_wait_ms * 509 / 4)
    # The job runs at the load of the whole backlog: queued batch work takes every slot it leaves.
    assert inter.concurrency == batch.concurrency == 64


def test_queued_batch_work_does_not_drive_interactive_work_off_a_saturated_gpu() -> None:
    # A GPU full of running work with 500 batch jobs queued behind: an interactive job takes
    # the next free slot. Charged for the batch queue, it looked like a miss and piled onto
    # the 8-slot accelerator (the collapse under overload, bench/POLICY.md).
    s = Snapshot(now=1000.0, pools={"gpu": lanes(64, 0, 0, 500), "accel": lanes(8, 2, 0, 0)})
    d = decide(SloRouter(DEFAULT), job(), "interactive", s)
    assert d.pool == "gpu" and "meets" in d.reason and d.predicted_ttft_ms is not None
    assert d.predicted_ttft_ms < 0.8 * DEFAULT.classes["interactive"].ttft_ms
    # A batch job would wait behind the whole queue, and it is told so.
    batch = SloRouter(DEFAULT).predict(job(), "gpu", s, lane=2)
    assert batch is not None and batch.queue_wait_ms > 100 * d.predicted_ttft_ms


def test_spill_over_counts_only_the_work_ahead_of_the_job() -> None:
    router = SloRouter(DEFAULT)
    # 58 running and 12 batch jobs queued: an interactive job starts at once on the cheap GPU.
    s = Snapshot(now=1000.0, pools={"gpu": lanes(58, 0, 0, 12), "accel": lanes(0)})
    assert decide(router, job(), "interactive", s).pool == "gpu"
    # Six interactive jobs queued beyond the 64 slots: it would queue, so it spills.
    s = Snapshot(now=1000.0, pools={"gpu": lanes(64, 6, 0, 0), "accel": lanes(0)})
    assert "spill from saturated gpu" in decide(router, job(), "interactive", s).reason


def test_the_accelerator_reservation_counts_every_lane() -> None:
    # Two running and two interactive jobs queued: half the accelerator is taken, whatever the
    # lanes, so batch work keeps off it (the slots are for interactive work).
    s = Snapshot(now=1000.0, pools={"gpu": lanes(64, 0, 0, 200), "accel": lanes(2, 2, 0, 0)})
    d = decide(SloRouter(DEFAULT), job(), "batch", s)
    assert d.pool == "gpu" and "accel kept for more urgent classes (backlog 4/8)" in d.reason


def test_a_router_counts_its_own_routing_on_the_jobs_lane() -> None:
    state = lanes(10, 1, 2, 3).routed(1, 4)
    assert state.backlog == 20 and state.queued == (1, 6, 3)
    assert PoolState(backlog=5).routed(2) == PoolState(backlog=6)  # not known by lane: the total only


# --------------------------------------------------------------------------- priority


def test_batch_fills_idle_accelerator_capacity_only() -> None:
    router = SloRouter(DEFAULT)
    # GPU saturated: batch (which would still meet there) spills to an idle accelerator...
    assert decide(router, job(), "batch", snap(gpu=200, accel=0)).pool == "accel"
    # ...but not once the accelerator is half full: those slots are kept for interactive work.
    d = decide(router, job(), "batch", snap(gpu=200, accel=4))
    assert d.pool == "gpu"
    assert "accel kept for more urgent classes" in d.reason
    assert decide(router, job(), "interactive", snap(gpu=200, accel=4)).pool == "accel"


def test_priority_is_what_reserves_the_accelerator() -> None:
    # The same batch class at interactive's priority is not held back.
    cfg = config(classes={"batch": {**RAW["classes"]["batch"], "priority": 0}})
    assert decide(SloRouter(cfg), job(), "batch", snap(gpu=200, accel=4)).pool == "accel"


def test_a_model_only_the_reserved_pool_serves_still_runs_there() -> None:
    cfg = config(pools={"gpu": {**RAW["pools"]["gpu"], "models": ["minilm-l6"]}})
    d = decide(SloRouter(cfg), job(), "batch", snap(gpu=0, accel=7))
    assert d.pool == "accel"


# --------------------------------------------------------------------------- estimator


def test_cold_start_is_the_device_profile() -> None:
    est = LatencyEstimator(DEFAULT)
    p = est.predict(job(prompt_tokens=1000), "gpu", PoolState(backlog=99, workers=1), 0.0)
    assert p is not None
    assert p.concurrency == 64  # capped at the pool's concurrency
    assert p.tpot_ms == pytest.approx(H100_8B.itl(64))
    assert p.ttft_ms - p.queue_wait_ms == pytest.approx(H100_8B.ttft(1000, 64))
    assert est.predict(job(model="minilm-l6"), "accel", PoolState(), 0.0) is None


def test_cold_queue_wait_is_waves_of_service_time() -> None:
    est = LatencyEstimator(DEFAULT)
    p = est.predict(job(), "gpu", PoolState(backlog=127, workers=1), 0.0)
    assert p is not None
    # 64 jobs beyond the 64 slots: one wave of this job's service time at full load.
    assert p.queue_wait_ms == pytest.approx(H100_8B.service_ms(100, 64, 64))
    idle = est.predict(job(), "gpu", PoolState(backlog=63, workers=1), 0.0)
    assert idle is not None and idle.queue_wait_ms == 0


def test_the_estimator_learns_a_slower_device() -> None:
    est = LatencyEstimator(DEFAULT)
    for i in range(60):
        est.observe(obs("gpu", M70, ttft=2 * H100_70B.ttft(1000, 1), tpot=2 * H100_70B.itl(1), at=i))
    ttft_f, tpot_f = est.factors("gpu", M70, 1)
    assert 1.8 < ttft_f <= 2.0 and 1.8 < tpot_f <= 2.0
    p = est.predict(job(model=M70), "gpu", PoolState(workers=1), 60.0)
    assert p is not None and p.tpot_ms == pytest.approx(2 * 18.6, rel=0.1)
    # The other model and the other pool are untouched.
    assert est.factors("gpu", M8, 1) == (1.0, 1.0) and est.factors("accel", M70, 1) == (1.0, 1.0)


def test_learning_changes_the_route() -> None:
    router = SloRouter(DEFAULT)
    assert decide(router, job(model=M70), "interactive", snap(gpu=0, accel=0)).pool == "gpu"
    for i in range(60):  # the GPU turns out twice as slow per token: 37 ms > 32
        router.observe(obs("gpu", M70, ttft=H100_70B.ttft(1000, 1), tpot=2 * H100_70B.itl(1), at=i))
    assert decide(router, job(model=M70), "interactive", snap(gpu=0, accel=0)).pool == "accel"


def test_an_outlier_is_clipped() -> None:
    est = LatencyEstimator(DEFAULT)
    for i in range(30):
        est.observe(obs("gpu", M8, ttft=H100_8B.ttft(1000, 1), tpot=H100_8B.itl(1), at=i))
    before = est.factors("gpu", M8, 1)
    est.observe(obs("gpu", M8, ttft=100 * H100_8B.ttft(1000, 1), tpot=100 * H100_8B.itl(1), at=31))
    after = est.factors("gpu", M8, 1)
    # Unclipped, an EWMA of weight 0.1 in log space would move by 100 ** 0.1 = 1.58x.
    assert after[0] / before[0] < 1.1 and after[1] / before[1] < 1.1
    assert after[0] > before[0]


def test_the_estimator_follows_drift_back() -> None:
    est = LatencyEstimator(DEFAULT)
    for i in range(60):
        est.observe(obs("gpu", M8, ttft=2 * H100_8B.ttft(1000, 1), tpot=2 * H100_8B.itl(1), at=i))
    for i in range(60, 160):
        est.observe(obs("gpu", M8, ttft=H100_8B.ttft(1000, 1), tpot=H100_8B.itl(1), at=i))
    assert est.factors("gpu", M8, 1) == pytest.approx((1.0, 1.0), rel=0.05)


def test_concurrency_buckets_are_learned_separately() -> None:
    est = LatencyEstimator(DEFAULT)
    for i in range(60):
        est.observe(obs("gpu", M8, c=1, ttft=H100_8B.ttft(1000, 1), tpot=H100_8B.itl(1), at=i))
        est.observe(obs("gpu", M8, c=64, ttft=2 * H100_8B.ttft(1000, 64), tpot=2 * H100_8B.itl(64), at=i))
    low, high = est.factors("gpu", M8, 1)[1], est.factors("gpu", M8, 64)[1]
    assert high > 1.6 and low < 1.25
    assert bucket(1) == 0 and bucket(3) == 1 and bucket(64) == bucket(127) == 6


def test_the_observed_drain_rate_sets_the_queue_wait_when_the_pool_runs_full() -> None:
    est = LatencyEstimator(DEFAULT)
    for i in range(32):  # ten completions a second at full concurrency
        est.observe(obs("gpu", M8, c=64, ttft=50, tpot=7, at=i / 10))
    rate = est.drain_rate("gpu", 3.1)
    assert rate == pytest.approx(10.0)
    p = est.predict(job(), "gpu", PoolState(backlog=83, workers=1), 3.1)
    assert p is not None and p.queue_wait_ms == pytest.approx(20 / 10 * 1000)  # 20 beyond capacity
    # A pool that stopped finishing work drains slower as time passes.
    assert est.drain_rate("gpu", 6.2) == pytest.approx(5.0)


def test_the_drain_rate_is_not_trusted_from_a_lightly_loaded_pool() -> None:
    est = LatencyEstimator(DEFAULT)
    for i in range(32):
        est.observe(obs("gpu", M8, c=3, ttft=50, tpot=7, at=i))
    assert est.drain_rate("gpu", 32.0) is None
    assert est.mean_service_ms("gpu") == pytest.approx(50 + 99 * 7)
    p = est.predict(job(), "gpu", PoolState(backlog=83, workers=1), 32.0)
    assert p is not None and p.queue_wait_ms == pytest.approx(20 * (50 + 99 * 7) / 64)


def test_observations_of_unknown_pools_or_models_are_ignored() -> None:
    est = LatencyEstimator(DEFAULT)
    est.observe(obs("nowhere", M8, ttft=1, tpot=1))
    est.observe(obs("accel", "minilm-l6", ttft=1, tpot=1))
    assert est.factors("accel", "minilm-l6", 1) == (1.0, 1.0)
    assert est.mean_service_ms("accel") is None


def test_job_cost_splits_the_worker_and_falls_per_token_with_load() -> None:
    gpu = DEFAULT.pools["gpu"]
    assert job_cost(gpu, 3_600_000.0, 1) == pytest.approx(3.0)
    assert job_cost(gpu, 3_600_000.0, 4) == pytest.approx(0.75)
    per_token = [job_cost(gpu, H100_8B.service_ms(1000, 200, c), c) / 200 for c in (1, 16, 64)]
    assert per_token == sorted(per_token, reverse=True)


# --------------------------------------------------------------------------- baselines


def test_gpu_only_and_accel_only() -> None:
    s = snap(gpu=500, accel=0)
    assert decide(GpuOnly(DEFAULT), job(), "interactive", s).pool == "gpu"
    assert decide(AccelOnly(DEFAULT), job(), "batch", snap(gpu=0, accel=500)).pool == "accel"
    d = decide(AccelOnly(DEFAULT), job(model="minilm-l6", kind="embedding"), "batch", s)
    assert d.pool == "gpu" and "fallback" in d.reason


def test_gpu_only_runs_a_model_only_the_accelerator_serves_there() -> None:
    cfg = config(pools={"gpu": {**RAW["pools"]["gpu"], "models": ["minilm-l6"]}})
    d = decide(GpuOnly(cfg), job(), "interactive", snap())
    assert d.pool == "accel" and "fallback" in d.reason


def test_round_robin_takes_turns_over_serving_pools() -> None:
    rr = RoundRobin(DEFAULT)
    pools = [decide(rr, job(), "standard", snap()).pool for _ in range(4)]
    assert pools == ["gpu", "accel", "gpu", "accel"]
    assert decide(rr, job(model="minilm-l6", kind="embedding"), "batch", snap()).pool == "gpu"


def test_join_shortest_queue_uses_backlog_per_slot() -> None:
    jsq = JoinShortestQueue(DEFAULT)
    assert decide(jsq, job(), "batch", snap(gpu=10, accel=2)).pool == "gpu"  # 0.16 < 0.25
    assert decide(jsq, job(), "batch", snap(gpu=40, accel=2)).pool == "accel"  # 0.63 > 0.25
    ties = {decide(jsq, job(), "batch", snap(gpu=0, accel=0), seed).pool for seed in range(20)}
    assert ties == {"gpu", "accel"}  # ties drawn from rng


def test_lowest_observed_latency_follows_observed_ttft() -> None:
    router = LowestObservedLatency(DEFAULT)
    router.observe(obs("gpu", M8, ttft=300, tpot=5))
    assert decide(router, job(), "batch", snap()).pool == "accel"  # never observed: tried
    router.observe(obs("accel", M8, ttft=100, tpot=1))
    assert decide(router, job(), "batch", snap(gpu=0, accel=500)).pool == "accel"  # load is invisible to it
    for _ in range(30):
        router.observe(obs("accel", M8, ttft=900, tpot=1))
    assert decide(router, job(), "batch", snap()).pool == "gpu"


def test_cheapest_first_ignores_load() -> None:
    assert decide(CheapestFirst(DEFAULT), job(), "interactive", snap(gpu=5000, accel=0)).pool == "gpu"


def test_the_oracle_uses_the_true_output_length() -> None:
    cfg = config(classes={"quick": {"ttft_ms": 500, "e2e_ms": 2000}})
    long = job(max_tokens=4096)  # at most 4096 tokens: neither pool can promise 1.6 s
    assert decide(warm(SloRouter(cfg)), long, "quick", snap(gpu=0, accel=0)).shed
    oracle = warm(OracleRouter(cfg))
    assert decide(oracle, long, "quick", snap(gpu=0, accel=0)).shed  # no truth: the SLO router
    oracle.truth = lambda j, pool, s: OracleTruth(output_tokens=50)
    d = decide(oracle, long, "quick", snap(gpu=0, accel=0))
    assert d.pool == "gpu" and d.predicted_e2e_ms == pytest.approx(H100_8B.service_ms(100, 50, 1))


def test_the_oracle_uses_true_device_times_and_waits() -> None:
    def truth(j: JobFeatures, pool: str, s: Snapshot) -> OracleTruth:
        return OracleTruth(output_tokens=64, ttft_ms=5.0, tpot_ms=50.0 if pool == "gpu" else 1.0, queue_wait_ms=0.0)

    d = decide(OracleRouter(DEFAULT, truth), job(), "interactive", snap(gpu=0, accel=0))
    assert d.pool == "accel"  # the GPU's real 50 ms per token misses 32
    assert d.predicted_ttft_ms == pytest.approx(5.0) and d.predicted_e2e_ms == pytest.approx(5 + 63 * 1.0)


def test_the_registry_holds_the_live_routers_and_the_evaluation_only_ones() -> None:
    assert list(ROUTERS) == [*LIVE_ROUTERS[:1], *EVALUATION_ROUTERS, *LIVE_ROUTERS[1:]]
    for name, make in ROUTERS.items():
        assert make(DEFAULT).name == name


@pytest.mark.parametrize("name", EVALUATION_ROUTERS)
def test_the_live_config_refuses_an_evaluation_only_router_and_names_them_all(name: str) -> None:
    with pytest.raises(ConfigError, match=f"'{name}' is an evaluation-only router") as refused:
        config_from_dict({**DEFAULT_DICT, "routing": {"policy": name}})
    assert all(other in str(refused.value) for other in EVALUATION_ROUTERS)
    assert "live routing takes slo or static" in str(refused.value)


# --------------------------------------------------------------------------- properties


MODELS = [M8, M70, "minilm-l6", "no-such-model"]
targets = st.fixed_dictionaries(
    {"ttft_ms": st.floats(1, 5000), "on_unattainable": st.sampled_from(["shed", "best_effort"]),
     "priority": st.integers(0, 3)},
    optional={"tpot_ms": st.floats(0.5, 100), "e2e_ms": st.floats(10, 60000)},
)
jobs = st.builds(job, model=st.sampled_from(MODELS), kind=st.sampled_from(JOB_KINDS),
                 prompt_tokens=st.integers(0, 20000), max_tokens=st.integers(0, 4096))
states = st.builds(PoolState, backlog=st.integers(0, 2000), workers=st.integers(0, 4))
snapshots = st.builds(Snapshot, now=st.floats(0, 1e9), pools=st.fixed_dictionaries({"gpu": states, "accel": states}))


@settings(max_examples=150, deadline=None)
@given(target=targets, j=jobs, s=snapshots, name=st.sampled_from(sorted(ROUTERS)), seed=st.integers(0, 2**32))
def test_properties_of_every_router(target: dict[str, Any], j: JobFeatures, s: Snapshot, name: str,
                                    seed: int) -> None:
    cfg = config(classes={"x": target})
    slo = "x"

    def fresh() -> Any:  # the SLO routers having seen a job on each pool, so that they may refuse
        router = ROUTERS[name](cfg)
        return warm(router) if isinstance(router, SloRouter) else router

    d = decide(fresh(), j, slo, s, seed)
    serving = cfg.serving(j.model, j.kind)
    # Never a pool that cannot serve the model and kind; always one when some pool can (unless shed).
    assert d.pool is None or d.pool in serving
    assert (d.pool is None) == (not serving or d.shed)
    # Shed only when the class says so, and then with the reason the wire contract names.
    if d.shed:
        assert target["on_unattainable"] == "shed" and d.reason.startswith("slo_unattainable: ")
        assert name in ("slo", "oracle")
    # Deterministic for a given seed and snapshot.
    assert decide(fresh(), j, slo, s, seed) == d
    # Before any pool has finished a job, nothing is refused.
    assert not decide(ROUTERS[name](cfg), j, slo, s, seed).shed


@settings(max_examples=150, deadline=None)
@given(target=targets, j=jobs, s=snapshots)
def test_the_slo_router_picks_a_meeting_pool_whenever_it_says_so(target: dict[str, Any], j: JobFeatures,
                                                                 s: Snapshot) -> None:
    cfg = config(classes={"x": target})
    router = warm(SloRouter(cfg))
    d = decide(router, j, "x", s)
    if d.pool is None or "best effort" in d.reason:
        return
    pred = router.predict(j, d.pool, s)
    assert isinstance(pred, Prediction)
    assert not misses(cfg.classes["x"], pred, cfg.routing.safety_margin)
    assert d.predicted_ttft_ms == pred.ttft_ms
