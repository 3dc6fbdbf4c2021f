"""Policy configuration (validation and the built-in default), runtime settings, URL redaction."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from broker.config import default_config_text, load_config
from broker.connection import redacted
from broker.settings import Settings
from broker.topology import Topology
from policies.config import ConfigError, PolicyConfig, config_from_dict, reserved_slots

VALID: dict[str, Any] = {
    "default_class": "standard",
    "default_pool": "gpu",
    "classes": {"interactive": {"ttft_ms": 500, "tpot_ms": 40}, "standard": {"ttft_ms": 2000}},
    "rules": [{"slo": "interactive", "kinds": ["chat"], "max_prompt_tokens": 4096}],
    "pools": {
        "gpu": {"models": ["llama-3.1-8b", "minilm-l6"], "profile": "h100"},
        "accel": {"models": ["llama-3.1-8b"], "kinds": ["chat"], "profile": "accel", "concurrency": 8,
                  "prefer_for": ["interactive"], "max_backlog": 8},
    },
}


def doc(**changes: Any) -> dict[str, Any]:
    """VALID with changes at ``__``-separated paths (``pools__accel__concurrency=9``); ``...`` deletes."""
    d = copy.deepcopy(VALID)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = d
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return d


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return str(info.value)


# --------------------------------------------------------------------------- policy config


def test_valid_config_loads() -> None:
    cfg = config_from_dict(VALID)
    assert isinstance(cfg, PolicyConfig)
    assert cfg.classes["interactive"].tpot_ms == 40.0 and cfg.classes["standard"].tpot_ms is None
    assert cfg.pools["accel"].prefer_for == ("interactive",)
    assert cfg.pools["gpu"].kinds == ("chat", "completion", "embedding")  # default: every kind


def test_lanes_rank_class_priorities() -> None:
    cfg = load_config()
    assert cfg.lanes == 3
    assert [cfg.lane(c) for c in ("interactive", "standard", "batch")] == [0, 1, 2]
    # Classes of equal priority share a lane; gaps between priorities do not make empty lanes.
    same = config_from_dict(doc(classes__interactive__priority=5, classes__standard__priority=5))
    assert same.lanes == 1 and same.lane("standard") == 0
    gap = config_from_dict(doc(classes__interactive__priority=-3, classes__standard__priority=40))
    assert gap.lanes == 2 and gap.lane("standard") == 1


def test_lanes_below_the_first_keep_their_min_share_of_slots() -> None:
    cfg = load_config()
    assert cfg.lane_shares == (0.0, 0.1, 0.1)  # the most urgent lane's share is moot: it is read first
    assert [reserved_slots(cfg.lane_shares, n) for n in (64, 8, 2)] == [(0, 7, 7), (0, 1, 1), (0, 0, 0)]
    # Rounded up unless that leaves the most urgent lane no slot; then rounded down.
    assert reserved_slots((0.0, 0.5), 4) == (0, 2) and reserved_slots((0.0, 0.3, 0.3), 2) == (0, 0, 0)
    shared = config_from_dict(doc(classes__standard__priority=1, classes__interactive__min_share=0.2,
                                  classes__batch={"ttft_ms": 60000, "priority": 1, "min_share": 0.25}))
    assert shared.lane_shares == (0.0, 0.35)  # classes of one lane add up
    assert "classes.standard.min_share" in error(doc(classes__standard__min_share=-0.1))
    too_much = doc(classes__standard__priority=1, classes__standard__min_share=0.6,
                   classes__batch={"ttft_ms": 60000, "priority": 2, "min_share": 0.4})
    assert "sum to 1" in error(too_much)


def test_pool_names_must_be_key_safe() -> None:
    data = doc()
    data["pools"]["gpu:1"] = data["pools"].pop("accel")
    assert "pools.gpu:1" in error(data) and "A-Z a-z 0-9 _ -" in error(data)


def test_config_is_frozen() -> None:
    cfg = config_from_dict(VALID)
    with pytest.raises(AttributeError):
        cfg.default_pool = "accel"  # type: ignore[misc]


def test_serving_lists_the_default_pool_first() -> None:
    cfg = config_from_dict(doc(pools__gpu__models=["llama-3.1-8b"]))
    assert cfg.serving("llama-3.1-8b", "chat") == ["gpu", "accel"]
    assert cfg.serving("llama-3.1-8b", "completion") == ["gpu"]
    assert cfg.serving("minilm-l6", "embedding") == []
    cfg = config_from_dict({**doc(), "pools": {"accel": VALID["pools"]["accel"], "gpu": VALID["pools"]["gpu"]}})
    assert cfg.serving("llama-3.1-8b", "chat") == ["gpu", "accel"]


def test_unknown_class_in_rule() -> None:
    msg = error(doc(rules=[{"slo": "turbo"}]))
    assert "rules[0].slo 'turbo'" in msg and "interactive" in msg


def test_unknown_class_in_second_rule_names_its_index() -> None:
    assert "rules[1].slo" in error(doc(rules=[{"slo": "standard"}, {"slo": "nope"}]))


def test_unknown_kind_in_rule() -> None:
    assert "rules[0].kinds" in error(doc(rules=[{"slo": "standard", "kinds": ["image"]}]))


def test_unknown_class_in_prefer_for() -> None:
    msg = error(doc(pools__accel__prefer_for=["urgent"]))
    assert "pools.accel.prefer_for" in msg and "'urgent'" in msg


def test_unknown_profile() -> None:
    msg = error(doc(pools__gpu__profile="tpu"))
    assert "pools.gpu.profile 'tpu'" in msg and "h100" in msg


def test_model_not_in_profile() -> None:
    msg = error(doc(pools__accel__models=["minilm-l6"]))
    assert "pools.accel" in msg and "'accel'" in msg and "'minilm-l6'" in msg


def test_instant_profile_serves_any_model() -> None:
    cfg = config_from_dict(doc(pools__gpu__profile="instant", pools__gpu__models=["anything-goes"]))
    assert cfg.pools["gpu"].models == ("anything-goes",)


def test_unknown_kind_in_pool() -> None:
    assert "pools.gpu.kinds" in error(doc(pools__gpu__kinds=["chat", "speech"]))


def test_concurrency_above_the_accel_cap() -> None:
    assert config_from_dict(doc(pools__accel__concurrency=8)).pools["accel"].concurrency == 8
    msg = error(doc(pools__accel__concurrency=9))
    assert "pools.accel.concurrency 9" in msg and "cap 8" in msg


def test_gpu_has_no_concurrency_cap() -> None:
    assert config_from_dict(doc(pools__gpu__concurrency=10_000)).pools["gpu"].concurrency == 10_000


@pytest.mark.parametrize("value", [0, -1])
def test_concurrency_must_be_positive(value: int) -> None:
    assert "pools.gpu.concurrency must be at least 1" in error(doc(pools__gpu__concurrency=value))


def test_default_pool_missing() -> None:
    msg = error(doc(default_pool="cpu"))
    assert "default_pool 'cpu'" in msg and "accel" in msg and "gpu" in msg


def test_default_pool_defaults_to_gpu_which_must_exist() -> None:
    d = doc(default_pool=...)
    d["pools"] = {"accel": d["pools"]["accel"]}
    assert "default_pool 'gpu'" in error(d)


def test_default_class_missing() -> None:
    assert "default_class 'batch'" in error(doc(default_class="batch"))


@pytest.mark.parametrize(("changes", "path", "expected"), [
    ({"classes__standard__ttft_ms": "fast"}, "$.classes", "ttft_ms"),
    ({"classes__standard__priority": 1.5}, "$.classes", "priority"),
    ({"pools__gpu__models": "llama-3.1-8b"}, "$.pools", "models"),
    ({"pools__gpu__concurrency": "64"}, "$.pools", "concurrency"),
    ({"rules__0__max_prompt_tokens": "x"}, "$.rules[0].max_prompt_tokens", ""),
    ({"rules": {"slo": "standard"}}, "$.rules", ""),
    ({"default_pool": 3}, "$.default_pool", ""),
])
def test_bad_types_name_the_path(changes: dict[str, Any], path: str, expected: str) -> None:
    msg = error(doc(**changes))
    assert f"`{path}" in msg, msg
    assert expected in msg


def test_missing_required_fields() -> None:
    assert "`classes`" in error({"pools": VALID["pools"]})
    assert "`pools`" in error({"classes": VALID["classes"]})
    assert "`ttft_ms`" in error(doc(classes__standard__ttft_ms=...))
    assert "`models`" in error(doc(pools__gpu__models=...))


@pytest.mark.parametrize(("changes", "field"), [
    ({"surprise": 1}, "surprise"),
    ({"pools__gpu__gpus": 4}, "gpus"),
    ({"classes__standard__tpot": 40}, "tpot"),
    ({"rules__0__tenant": "acme"}, "tenant"),
])
def test_unknown_keys_are_errors(changes: dict[str, Any], field: str) -> None:
    """A misspelt key must not be silently ignored."""
    assert f"`{field}`" in error(doc(**changes))


def test_bad_type_names_the_class_and_pool() -> None:
    assert "$.classes.standard.ttft_ms" in error(doc(classes__standard__ttft_ms="fast"))
    assert "$.pools.gpu.concurrency" in error(doc(pools__gpu__concurrency="64"))


# --------------------------------------------------------------------------- built-in default and files


def test_builtin_default_loads() -> None:
    cfg = load_config()
    assert set(cfg.classes) >= {"interactive", "standard", "batch"}
    assert cfg.default_pool == "gpu" and cfg.default_pool in cfg.pools
    assert cfg.default_class in cfg.classes
    assert "interactive" in cfg.pools["accel"].prefer_for
    assert cfg.pools["accel"].profile == "accel" and cfg.pools["gpu"].profile == "h100"
    assert "minilm-l6" not in cfg.pools["accel"].models
    assert cfg.rules


def test_default_text_is_what_load_config_uses() -> None:
    assert config_from_dict(tomllib.loads(default_config_text())) == load_config()


def test_load_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(default_config_text().replace("max_backlog = 8", "max_backlog = 3"))
    assert load_config(path).pools["accel"].max_backlog == 3


def test_load_config_errors_start_with_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(default_config_text().replace('profile = "accel"', 'profile = "tpu"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "'tpu'" in str(info.value)


def test_load_config_reports_toml_syntax_errors(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[classes.standard\nttft_ms = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_config(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- settings


def test_settings_defaults() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.redis_url, s.prefix, s.config, s.grace_s) == (None, "ib", None, 30.0)
    assert s.topology == Topology("ib")


def test_settings_read_the_environment() -> None:
    env = {"REDIS_URL": "redis://h:1/2", "IB_PREFIX": "prod", "IB_CONFIG": "/etc/ib.toml", "IB_GRACE_S": "2.5",
           "UNRELATED": "x"}
    s = Settings.from_env(env)
    assert s.redis_url == "redis://h:1/2"
    assert s.prefix == "prod" and s.topology.jobs == "prod:{prod}:jobs"
    assert s.config == Path("/etc/ib.toml")
    assert s.grace_s == 2.5


def test_settings_empty_variables_are_unset() -> None:
    assert Settings.from_env({"REDIS_URL": "", "IB_PREFIX": "", "IB_CONFIG": "", "IB_GRACE_S": ""}) == Settings()


def test_settings_overrides_win() -> None:
    env = {"REDIS_URL": "redis://env", "IB_PREFIX": "env", "IB_GRACE_S": "9"}
    s = Settings.from_env(env, redis_url="redis://flag", prefix="flag", grace_s=1.0, batch=8)
    assert (s.redis_url, s.prefix, s.grace_s, s.batch) == ("redis://flag", "flag", 1.0, 8)


def test_settings_none_overrides_are_ignored() -> None:
    env = {"REDIS_URL": "redis://env", "IB_PREFIX": "env", "IB_CONFIG": "/x.toml"}
    s = Settings.from_env(env, redis_url=None, prefix=None, config=None, grace_s=None)
    assert (s.redis_url, s.prefix, s.config, s.grace_s) == ("redis://env", "env", Path("/x.toml"), 30.0)


def test_settings_read_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IB_PREFIX", "fromproc")
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert Settings.from_env().prefix == "fromproc"


def test_settings_bad_grace_is_an_error() -> None:
    with pytest.raises(ValueError):
        Settings.from_env({"IB_GRACE_S": "soon"})


def test_settings_reject_an_invalid_prefix() -> None:
    with pytest.raises(ValueError, match="prefix"):
        Settings.from_env({"IB_PREFIX": "bad prefix"})


# --------------------------------------------------------------------------- redacted


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
    ("redis://:s3cret@host:6379", "redis://***@host:6379"),
    ("rediss://default:s3cret@h.example.com:6380/1", "rediss://default:***@h.example.com:6380/1"),
    ("redis://u:p@ss@host/0", "redis://u:***@host/0"),
])
def test_redacted_hides_passwords(url: str, expected: str) -> None:
    out = redacted(url)
    assert out == expected
    assert "s3cret" not in out and "p@ss" not in out


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "redis://user@host:1", "unix:///tmp/redis.sock"])
def test_redacted_leaves_urls_without_password_alone(url: str) -> None:
    assert redacted(url) == url


def test_redacted_hides_a_query_string_password() -> None:
    assert "s3cret" not in redacted("redis://host:6379/0?password=s3cret")


def test_the_demo_can_move_embeddings_to_an_in_process_model_pool() -> None:
    from broker.config import with_minilm_pool

    cfg = config_from_dict(tomllib.loads(with_minilm_pool(default_config_text())))
    assert cfg.pools["embed"].backend == "minilm"
    assert cfg.serving("minilm-l6", "embedding") == ["embed"]  # nowhere else
    assert cfg.serving("llama-3.1-8b", "chat") == ["gpu", "accel"]
    with pytest.raises(ValueError, match="no GPU pool serving minilm-l6"):
        with_minilm_pool("[pools.gpu]\nmodels = []\n")
