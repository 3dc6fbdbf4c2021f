"""The pure policy code: device latency models, SLO classification and routing.

No Redis, no clock: everything here is a function of its arguments, which is what the
tests lean on (exact figures, decision tables, determinism, properties).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import load_config
from policies import (
    PROFILES,
    ClassRule,
    Decision,
    JobFeatures,
    ModelProfile,
    PoolState,
    Snapshot,
    classify,
    config_from_dict,
    route,
)
from policies.profiles import interpolate

DEFAULT = load_config()
H100 = PROFILES["h100"]
ACCEL = PROFILES["accel"]
H100_8B = H100.models["llama-3.1-8b"]
H100_70B = H100.models["llama-3.3-70b"]
ACCEL_8B = ACCEL.models["llama-3.1-8b"]
ACCEL_70B = ACCEL.models["llama-3.3-70b"]


def job(**kw: object) -> JobFeatures:
    base: dict[str, object] = dict(tenant="t", model="llama-3.1-8b", kind="chat", prompt_tokens=100, max_tokens=64)
    base.update(kw)
    return JobFeatures(**base)  # type: ignore[arg-type]


def snap(**backlogs: int) -> Snapshot:
    return Snapshot(now=1_700_000_000.0, pools={n: PoolState(backlog=b, workers=1) for n, b in backlogs.items()})


# --------------------------------------------------------------------------- interpolation


POINTS = ((1.0, 10.0), (100.0, 150.0), (250.0, 600.0))


@pytest.mark.parametrize(("x", "y"), [(1, 10.0), (100, 150.0), (250, 600.0)])
def test_interpolate_hits_each_point(x: float, y: float) -> None:
    assert interpolate(POINTS, x) == pytest.approx(y)


def test_interpolate_is_linear_between_points() -> None:
    assert interpolate(POINTS, 50.5) == pytest.approx(80.0)  # halfway from (1, 10) to (100, 150)
    assert interpolate(POINTS, 175) == pytest.approx(375.0)  # halfway from (100, 150) to (250, 600)


def test_interpolate_extrapolates_along_the_last_segment() -> None:
    # Last segment has slope 3 ms per unit: 50 past the end adds 150.
    assert interpolate(POINTS, 300) == pytest.approx(750.0)
    assert interpolate(POINTS, 1000) == pytest.approx(600.0 + 3 * 750)


def test_interpolate_clamps_below_the_first_point() -> None:
    assert interpolate(POINTS, 0) == 10.0
    assert interpolate(POINTS, -50) == 10.0


def test_interpolate_single_point_is_constant() -> None:
    for x in (-1, 0, 1, 5, 1e6):
        assert interpolate(((1.0, 7.0),), x) == 7.0


_xs = st.floats(min_value=-10, max_value=1000, allow_nan=False)


@given(_xs, _xs)
def test_interpolate_is_monotone_on_rising_points(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert interpolate(POINTS, lo) <= interpolate(POINTS, hi) + 1e-9


# --------------------------------------------------------------------------- ModelProfile


def test_ttft_scales_with_prompt_length() -> None:
    p = ModelProfile(ttft_ms=((1, 100.0),), itl_ms=((1, 1.0),), ref_prompt_tokens=1000)
    assert p.ttft(1000, 1) == pytest.approx(100.0)
    assert p.ttft(2000, 1) == pytest.approx(200.0)
    assert p.ttft(500, 1) == pytest.approx(50.0)


def test_short_prompts_pay_the_minimum_prefill_fraction() -> None:
    p = ModelProfile(ttft_ms=((1, 100.0),), itl_ms=((1, 1.0),), ref_prompt_tokens=1000, min_prefill_fraction=0.2)
    assert p.ttft(0, 1) == pytest.approx(20.0)
    assert p.ttft(1, 1) == pytest.approx(20.0)
    assert p.ttft(200, 1) == pytest.approx(20.0)  # exactly at the fraction
    assert p.ttft(300, 1) == pytest.approx(30.0)  # above it, proportional again
    assert ACCEL_8B.ttft(1, 1) == pytest.approx(0.8 * 120.0)


def test_ttft_rises_with_concurrency() -> None:
    values = [H100_8B.ttft(1000, c) for c in (1, 50, 100, 200, 250, 400)]
    assert values == sorted(values)
    assert values[0] < values[-1]


@pytest.mark.parametrize("c", [0, -5])
def test_concurrency_below_one_counts_as_one(c: int) -> None:
    assert H100_8B.itl(c) == H100_8B.itl(1)
    assert H100_8B.ttft(1000, c) == H100_8B.ttft(1000, 1)


@pytest.mark.parametrize("device", sorted(PROFILES))
def test_itl_never_falls_as_concurrency_rises(device: str) -> None:
    profile = PROFILES[device]
    for name, model in {**profile.models, "<default>": profile.default}.items():
        if model is None:
            continue
        values = [model.itl(c) for c in range(1, 401)]
        assert values == sorted(values), (device, name)


@pytest.mark.parametrize("model", [H100_8B, H100_70B, ACCEL_8B, ACCEL_70B])
def test_itl_strictly_rises_for_llama_models(model: ModelProfile) -> None:
    assert model.itl(1) < model.itl(8) < model.itl(50)


def test_service_time_is_ttft_plus_decode() -> None:
    assert H100_8B.service_ms(1000, 1, 1) == pytest.approx(10.0)  # one token: no decode gaps
    assert H100_8B.service_ms(1000, 0, 1) == pytest.approx(10.0)
    assert H100_8B.service_ms(1000, 101, 1) == pytest.approx(10.0 + 100 * 4.6)
    assert H100_8B.service_ms(2000, 11, 100) == pytest.approx(300.0 + 10 * 7.6)


# The published figures (NVIDIA NIM benchmarks, vendor posts) at the points they were measured.


@pytest.mark.parametrize(("c", "itl"), [(1, 4.6), (100, 7.6), (250, 16.0)])
def test_h100_llama8b_itl_published(c: int, itl: float) -> None:
    assert H100_8B.itl(c) == pytest.approx(itl)


@pytest.mark.parametrize(("c", "ttft"), [(1, 10.0), (250, 600.0)])
def test_h100_llama8b_ttft_published(c: int, ttft: float) -> None:
    assert H100_8B.ttft(1000, c) == pytest.approx(ttft)


def test_h100_llama70b_published() -> None:
    assert H100_70B.ttft(5000, 1) == pytest.approx(410.0)
    assert H100_70B.ttft(5000, 100) == pytest.approx(8000.0)
    assert H100_70B.itl(1) == pytest.approx(18.6)
    assert H100_70B.itl(50) == pytest.approx(60.0)
    # Saturates near 920 tok/s in total at c=100.
    assert 100 * 1000 / H100_70B.itl(100) == pytest.approx(920, rel=0.02)


def test_accelerator_published_per_user_speeds() -> None:
    assert 1000 / ACCEL_8B.itl(1) == pytest.approx(1800)
    assert 1000 / ACCEL_70B.itl(1) == pytest.approx(450)
    assert ACCEL_70B.ttft(5000, 1) == pytest.approx(240.0)
    assert ACCEL.max_concurrency == 8
    assert H100.max_concurrency is None


def test_accelerator_beats_gpu_per_user_and_gpu_is_not_capped() -> None:
    assert ACCEL_8B.itl(8) < H100_8B.itl(1)
    assert ACCEL_70B.itl(8) < H100_70B.itl(1)


def test_device_model_lookup() -> None:
    assert H100.model("llama-3.1-8b") is H100_8B
    assert H100.model("minilm-l6") is not None
    assert H100.model("no-such-model") is None
    assert ACCEL.model("minilm-l6") is None
    instant = PROFILES["instant"]
    anything = instant.model("whatever-model")
    assert anything is not None
    assert anything.service_ms(10_000, 1000, 500) == 0.0


# --------------------------------------------------------------------------- classify


def rules_config(*rules: dict[str, object], default_class: str = "standard") -> object:
    return config_from_dict({
        "classes": {"interactive": {"ttft_ms": 500}, "standard": {"ttft_ms": 2000}, "batch": {"ttft_ms": 60000}},
        "default_class": default_class,
        "rules": list(rules),
        "pools": {"gpu": {"models": ["llama-3.1-8b", "minilm-l6"]}},
    })


def test_hint_wins_over_rules() -> None:
    cfg = rules_config({"slo": "interactive"})
    assert classify(job(slo_hint="batch"), cfg) == ("batch", "hint")  # type: ignore[arg-type]


def test_unknown_hint_falls_back_to_rules_and_says_so() -> None:
    cfg = rules_config({"slo": "batch", "kinds": ["embedding"]}, {"slo": "interactive", "kinds": ["chat"]})
    slo, reason = classify(job(slo_hint="urgent"), cfg)  # type: ignore[arg-type]
    assert slo == "interactive"
    assert "unknown hint 'urgent' ignored" in reason
    assert "rule 1" in reason


def test_unknown_hint_falls_back_to_default_and_says_so() -> None:
    slo, reason = classify(job(slo_hint="urgent"), rules_config())  # type: ignore[arg-type]
    assert slo == "standard"
    assert "unknown hint 'urgent'" in reason and "default" in reason


def test_first_matching_rule_wins() -> None:
    cfg = rules_config({"slo": "batch", "kinds": ["chat"]}, {"slo": "interactive", "kinds": ["chat"]})
    assert classify(job(), cfg) == ("batch", "rule 0")  # type: ignore[arg-type]
    cfg = rules_config({"slo": "batch", "kinds": ["embedding"]}, {"slo": "interactive", "kinds": ["chat"]})
    assert classify(job(), cfg) == ("interactive", "rule 1")  # type: ignore[arg-type]


def test_no_rule_matches_gives_the_default_class() -> None:
    cfg = rules_config({"slo": "batch", "tenants": ["other"]}, default_class="interactive")
    assert classify(job(), cfg) == ("interactive", "default")  # type: ignore[arg-type]


def test_empty_rule_matches_everything() -> None:
    assert classify(job(), rules_config({"slo": "batch"})) == ("batch", "rule 0")  # type: ignore[arg-type]


# Each condition: (rule fields, a job that matches, a job that does not).
CONDITIONS = [
    ({"tenants": ["acme", "globex"]}, {"tenant": "acme"}, {"tenant": "initech"}),
    ({"models": ["minilm-l6"]}, {"model": "minilm-l6"}, {"model": "llama-3.1-8b"}),
    ({"kinds": ["completion"]}, {"kind": "completion"}, {"kind": "chat"}),
    ({"max_prompt_tokens": 100}, {"prompt_tokens": 100}, {"prompt_tokens": 101}),
    ({"min_prompt_tokens": 100}, {"prompt_tokens": 100}, {"prompt_tokens": 99}),
    ({"max_output_tokens": 64}, {"max_tokens": 64}, {"max_tokens": 65}),
    ({"min_output_tokens": 64}, {"max_tokens": 64}, {"max_tokens": 63}),
]


@pytest.mark.parametrize(("cond", "hit", "miss"), CONDITIONS, ids=[next(iter(c[0])) for c in CONDITIONS])
def test_each_rule_condition(cond: dict[str, object], hit: dict[str, object], miss: dict[str, object]) -> None:
    cfg = rules_config({"slo": "batch", **cond})
    assert classify(job(**hit), cfg) == ("batch", "rule 0")  # type: ignore[arg-type]
    assert classify(job(**miss), cfg) == ("standard", "default")  # type: ignore[arg-type]


def test_rule_needs_every_condition() -> None:
    cfg = rules_config({"slo": "batch", "kinds": ["chat"], "tenants": ["acme"]})
    assert classify(job(kind="chat", tenant="acme"), cfg)[0] == "batch"  # type: ignore[arg-type]
    assert classify(job(kind="chat", tenant="other"), cfg)[0] == "standard"  # type: ignore[arg-type]
    assert classify(job(kind="completion", tenant="acme"), cfg)[0] == "standard"  # type: ignore[arg-type]


def test_default_config_classification() -> None:
    assert classify(job(max_tokens=2048), DEFAULT)[0] == "batch"
    assert classify(job(kind="embedding", model="minilm-l6", prompt_tokens=4096), DEFAULT)[0] == "batch"
    assert classify(job(kind="embedding", model="minilm-l6", prompt_tokens=10), DEFAULT)[0] == "standard"
    assert classify(job(prompt_tokens=1000), DEFAULT)[0] == "interactive"
    assert classify(job(prompt_tokens=10_000), DEFAULT)[0] == "standard"
    assert classify(job(kind="completion"), DEFAULT)[0] == "standard"


def test_class_rule_defaults_are_all_unset() -> None:
    rule = ClassRule(slo="x")
    assert (rule.tenants, rule.models, rule.kinds) == ((), (), ())
    assert rule.max_prompt_tokens is rule.min_prompt_tokens is rule.max_output_tokens is rule.min_output_tokens is None


# --------------------------------------------------------------------------- route: decision table


@pytest.mark.parametrize("backlog", [0, 1, 7])
def test_interactive_goes_to_accel_while_it_has_room(backlog: int) -> None:
    d = route(job(), "interactive", DEFAULT, snap(accel=backlog, gpu=0))
    assert d.pool == "accel"
    assert f"backlog {backlog} < 8" in d.reason
    assert d.predicted_ttft_ms is not None and d.predicted_ttft_ms > 0


def test_interactive_goes_to_accel_with_an_empty_snapshot() -> None:
    d = route(job(), "interactive", DEFAULT, Snapshot(now=0.0))
    assert d.pool == "accel"


@pytest.mark.parametrize("backlog", [8, 9, 500])
def test_interactive_spills_to_gpu_at_or_over_max_backlog(backlog: int) -> None:
    d = route(job(), "interactive", DEFAULT, snap(accel=backlog, gpu=0))
    assert d.pool == "gpu"
    assert f"accel backlog {backlog} >= 8" in d.reason
    assert "gpu (default)" in d.reason


def test_gpu_backlog_does_not_send_interactive_away_from_a_free_accel() -> None:
    assert route(job(), "interactive", DEFAULT, snap(accel=0, gpu=10_000)).pool == "accel"


def test_model_the_accel_lacks_goes_to_gpu() -> None:
    d = route(job(model="minilm-l6", kind="embedding"), "interactive", DEFAULT, snap(accel=0))
    assert d.pool == "gpu"
    assert "accel does not serve embedding on minilm-l6" in d.reason
    assert d.reason.endswith("gpu (default)")


def test_kind_the_accel_does_not_serve_goes_to_gpu() -> None:
    d = route(job(kind="embedding"), "interactive", DEFAULT, snap(accel=0))
    assert d.pool == "gpu"


def test_kind_mismatch_reason_names_the_kind() -> None:
    """accel serves llama-3.1-8b, just not embeddings: the reason must not claim it lacks the model."""
    d = route(job(kind="embedding"), "interactive", DEFAULT, snap(accel=0))
    assert "lacks" not in d.reason
    assert "accel does not serve embedding on llama-3.1-8b" in d.reason


@pytest.mark.parametrize("kind", ["chat", "completion", "embedding"])
def test_model_no_pool_serves_gives_no_pool(kind: str) -> None:
    d = route(job(model="gpt-x", kind=kind), "interactive", DEFAULT, snap())
    assert d.pool is None
    assert d.predicted_ttft_ms is None
    assert "gpt-x" in d.reason and kind in d.reason


@pytest.mark.parametrize("slo", ["standard", "batch"])
def test_non_preferring_classes_go_to_the_default_pool(slo: str) -> None:
    d = route(job(), slo, DEFAULT, snap(accel=0, gpu=1000))
    assert d.pool == "gpu"
    assert d.reason == "gpu (default)"


def test_non_default_pool_when_the_default_cannot_serve() -> None:
    cfg = config_from_dict({
        "classes": {"standard": {"ttft_ms": 2000}, "interactive": {"ttft_ms": 500}},
        "pools": {
            "gpu": {"models": ["minilm-l6"], "profile": "h100"},
            "accel": {"models": ["llama-3.1-8b"], "profile": "accel", "concurrency": 8,
                      "prefer_for": ["interactive"], "max_backlog": 2},
        },
    })
    d = route(job(), "standard", cfg, snap(accel=100))
    assert d.pool == "accel"
    assert "(default)" not in d.reason
    spilled = route(job(), "interactive", cfg, snap(accel=2))
    assert spilled.pool == "accel"  # nowhere else serves it
    assert "accel backlog 2 >= 2" in spilled.reason


def test_max_backlog_zero_never_prefers() -> None:
    cfg = config_from_dict({
        "classes": {"standard": {"ttft_ms": 2000}},
        "pools": {"gpu": {"models": ["llama-3.1-8b"]},
                  "fast": {"models": ["llama-3.1-8b"], "prefer_for": ["standard"], "max_backlog": 0}},
    })
    assert route(job(), "standard", cfg, snap()).pool == "gpu"


def test_predicted_ttft_matches_the_profile_when_idle() -> None:
    d = route(job(prompt_tokens=1000), "standard", DEFAULT, snap(gpu=0))
    assert d.predicted_ttft_ms == pytest.approx(H100_8B.ttft(1000, 1))
    d = route(job(prompt_tokens=1000), "interactive", DEFAULT, snap(accel=0))
    assert d.predicted_ttft_ms == pytest.approx(ACCEL_8B.ttft(1000, 1))


def test_predicted_ttft_grows_with_backlog() -> None:
    idle = route(job(), "standard", DEFAULT, snap(gpu=0)).predicted_ttft_ms
    busy = route(job(), "standard", DEFAULT, snap(gpu=64)).predicted_ttft_ms
    queued = route(job(), "standard", DEFAULT, snap(gpu=1000)).predicted_ttft_ms
    assert idle is not None and busy is not None and queued is not None
    assert idle < busy < queued


def test_route_is_deterministic() -> None:
    for slo, s in [("interactive", snap(accel=3)), ("interactive", snap(accel=9)), ("batch", snap())]:
        first = route(job(), slo, DEFAULT, s)
        again = [route(job(), slo, DEFAULT, s) for _ in range(5)]
        assert all(isinstance(d, Decision) and d == first for d in again)


# --------------------------------------------------------------------------- route: properties

MODELS = ["llama-3.1-8b", "llama-3.3-70b", "minilm-l6"]
KINDS = ["chat", "completion", "embedding"]
CLASSES = ["interactive", "standard", "batch"]


@st.composite
def configs(draw: st.DrawFn) -> object:
    n = draw(st.integers(min_value=1, max_value=4))
    names = [f"p{i}" for i in range(n)]
    pools: dict[str, object] = {}
    for name in names:
        profile = draw(st.sampled_from(["h100", "accel", "instant"]))
        allowed = {"h100": MODELS, "accel": MODELS[:2], "instant": [*MODELS, "custom-model"]}[profile]
        pools[name] = {
            "models": draw(st.lists(st.sampled_from(allowed), max_size=3, unique=True)),
            "kinds": draw(st.lists(st.sampled_from(KINDS), min_size=0, max_size=3, unique=True)),
            "profile": profile,
            "concurrency": draw(st.integers(1, 8 if profile == "accel" else 128)),
            "prefer_for": draw(st.lists(st.sampled_from(CLASSES), max_size=3, unique=True)),
            "max_backlog": draw(st.integers(0, 20)),
        }
    return config_from_dict({
        "classes": {c: {"ttft_ms": 1000} for c in CLASSES},
        "pools": pools,
        "default_pool": draw(st.sampled_from(names)),
    })


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    names = draw(st.lists(st.sampled_from(["p0", "p1", "p2", "p3", "gpu", "accel", "ghost"]), unique=True))
    pools = {
        n: PoolState(backlog=draw(st.integers(0, 5000)), workers=draw(st.integers(0, 16)),
                     in_flight=draw(st.integers(0, 500)), capacity=draw(st.integers(0, 1000)))
        for n in names
    }
    return Snapshot(now=draw(st.floats(0, 2e9)), pools=pools)


features = st.builds(
    JobFeatures,
    tenant=st.sampled_from(["a", "b"]),
    model=st.sampled_from([*MODELS, "custom-model", "unknown"]),
    kind=st.sampled_from(KINDS),
    prompt_tokens=st.integers(0, 200_000),
    max_tokens=st.integers(0, 100_000),
    slo_hint=st.none() | st.sampled_from([*CLASSES, "bogus"]),
)


def _check_decision(f: JobFeatures, slo: str, cfg: object, s: Snapshot) -> None:
    d = route(f, slo, cfg, s)  # type: ignore[arg-type]
    pools = cfg.pools  # type: ignore[attr-defined]
    servers = [n for n, p in pools.items() if f.model in p.models and f.kind in p.kinds]
    if d.pool is None:
        assert servers == [], d
        assert d.predicted_ttft_ms is None
    else:
        assert d.pool in servers, d
        assert d.predicted_ttft_ms is not None
        assert math.isfinite(d.predicted_ttft_ms) and d.predicted_ttft_ms >= 0
        with_room = [n for n in servers if slo in pools[n].prefer_for
                     and s.pools.get(n, PoolState()).backlog < pools[n].max_backlog]
        default = cfg.default_pool  # type: ignore[attr-defined]
        if with_room:
            # A preferring pool with room always gets the job.
            assert d.pool in with_room, d
        elif default in servers:
            assert d.pool == default, d
    assert route(f, slo, cfg, s) == d  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(configs(), features, snapshots(), st.sampled_from(CLASSES))
def test_route_always_picks_a_pool_that_serves_the_job(cfg: object, f: JobFeatures, s: Snapshot, slo: str) -> None:
    _check_decision(f, slo, cfg, s)


@settings(max_examples=200, deadline=None)
@given(features, snapshots())
def test_classify_then_route_on_the_default_config(f: JobFeatures, s: Snapshot) -> None:
    slo, reason = classify(f, DEFAULT)
    assert slo in DEFAULT.classes
    assert reason
    _check_decision(f, slo, DEFAULT, s)
