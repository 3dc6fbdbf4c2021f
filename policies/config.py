"""Policy configuration: SLO classes, classification rules and pools.

Plain frozen data with working defaults. Parsing a TOML *string* is pure, so it lives
here; reading the file is the caller's business (``broker.config``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgspec

from policies.profiles import PROFILES

JOB_KINDS = ("chat", "completion", "embedding")


class ConfigError(ValueError):
    """The policy configuration is invalid; the message says where and why."""


class SLOClass(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A latency target. A job meets it when every target that is set holds."""

    ttft_ms: float
    """Time to first token, measured from submission (queueing included)."""
    tpot_ms: float | None = None
    """Mean time per output token after the first."""
    e2e_ms: float | None = None
    """Submission to last token."""
    priority: int = 0
    """Lower runs first when pools are contended."""
    attainment: float = 0.9
    """Share of the class's jobs that should meet the target."""
    on_unattainable: Literal["best_effort", "shed"] = "best_effort"
    """When no pool is predicted to meet the target: run anyway, or refuse at once (``rejected``)."""


class ClassRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Assigns ``slo`` to jobs matching every condition that is set. First match wins."""

    slo: str
    tenants: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    max_prompt_tokens: int | None = None
    min_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    min_output_tokens: int | None = None


class PoolSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A worker pool: what it serves, how much it takes, what it costs."""

    models: tuple[str, ...]
    kinds: tuple[str, ...] = JOB_KINDS
    profile: str = "h100"
    """Device profile name (``policies.profiles.PROFILES``) for simulated backends and estimates."""
    concurrency: int = 64
    """Jobs one worker of this pool runs at once."""
    cost_per_hour: float = 3.0
    prefer_for: tuple[str, ...] = ()
    """SLO classes that go to this pool first when it has room (static routing)."""
    max_backlog: int = 64
    """Queued jobs per pool above which preferring classes spill to the default pool."""


class RoutingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which router decides, and how cautiously."""

    policy: Literal["static", "slo", "oracle", "gpu_only", "accel_only", "round_robin", "jsq", "lowest_latency",
                    "cheapest_first"] = "static"
    """``slo``: the cheapest pool predicted to meet the class's target; ``static``: class
    preferences plus backlog; the others are the baselines of ``policies.baselines``."""
    safety_margin: float = 0.8
    """A pool counts as meeting a target when its prediction is within this share of it."""


class PolicyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the policy worker decides with."""

    classes: dict[str, SLOClass]
    rules: tuple[ClassRule, ...] = ()
    default_class: str = "standard"
    pools: dict[str, PoolSpec]
    default_pool: str = "gpu"
    """Where jobs go when no preferred pool has room: the general-purpose pool."""
    routing: RoutingConfig = RoutingConfig()

    def serving(self, model: str, kind: str) -> list[str]:
        """Names of the pools that can run ``model`` jobs of ``kind``, default pool first."""
        names = sorted(self.pools, key=lambda n: n != self.default_pool)
        return [n for n in names if model in self.pools[n].models and kind in self.pools[n].kinds]


def _check(cfg: PolicyConfig) -> PolicyConfig:
    if cfg.default_class not in cfg.classes:
        raise ConfigError(f"default_class {cfg.default_class!r} is not one of classes {sorted(cfg.classes)}")
    if cfg.default_pool not in cfg.pools:
        raise ConfigError(f"default_pool {cfg.default_pool!r} is not one of pools {sorted(cfg.pools)}")
    for i, rule in enumerate(cfg.rules):
        if rule.slo not in cfg.classes:
            raise ConfigError(f"rules[{i}].slo {rule.slo!r} is not one of classes {sorted(cfg.classes)}")
        for kind in rule.kinds:
            if kind not in JOB_KINDS:
                raise ConfigError(f"rules[{i}].kinds: {kind!r} is not one of {JOB_KINDS}")
    for name, pool in cfg.pools.items():
        where = f"pools.{name}"
        if pool.profile not in PROFILES:
            raise ConfigError(f"{where}.profile {pool.profile!r} is not one of {sorted(PROFILES)}")
        profile = PROFILES[pool.profile]
        for model in pool.models:
            if profile.model(model) is None:
                raise ConfigError(f"{where}: profile {pool.profile!r} has no model {model!r}")
        for kind in pool.kinds:
            if kind not in JOB_KINDS:
                raise ConfigError(f"{where}.kinds: {kind!r} is not one of {JOB_KINDS}")
        for slo in pool.prefer_for:
            if slo not in cfg.classes:
                raise ConfigError(f"{where}.prefer_for: {slo!r} is not one of classes {sorted(cfg.classes)}")
        if pool.concurrency < 1:
            raise ConfigError(f"{where}.concurrency must be at least 1")
        cap = profile.max_concurrency
        if cap is not None and pool.concurrency > cap:
            raise ConfigError(f"{where}.concurrency {pool.concurrency} exceeds the {pool.profile!r} device cap {cap}")
    return cfg


def pool_counts(config: PolicyConfig, items: Iterable[str], base: Mapping[str, int]) -> dict[str, int]:
    """Worker counts per pool: ``base`` overridden by ``POOL=N`` items (each may be a comma list)."""
    counts = {pool: base.get(pool, 0) for pool in config.pools}
    for item in (part for text in items for part in text.replace(" ", "").split(",") if part):
        pool, _, n = item.partition("=")
        if pool not in counts or not n.isdigit():
            raise ConfigError(f"{item!r}: expected POOL=N with POOL one of {', '.join(counts)}")
        counts[pool] = int(n)
    return counts


def config_from_dict(data: dict[str, Any]) -> PolicyConfig:
    """Validate a parsed TOML document into a :class:`PolicyConfig`.

    Errors name the offending path, e.g. ``Expected `float`, got `str` - at `$.classes.interactive.ttft_ms```.
    """
    # Entries of the name-keyed tables first, so an error names the class or pool
    # (msgspec itself reports dict values as `$.classes[...]`).
    for section, kind in (("classes", SLOClass), ("pools", PoolSpec)):
        entries = data.get(section)
        if isinstance(entries, dict):
            for name, value in entries.items():
                try:
                    msgspec.convert(value, kind)
                except msgspec.ValidationError as exc:
                    message = str(exc)
                    if "`$" in message:
                        raise ConfigError(message.replace("`$", f"`$.{section}.{name}")) from None
                    raise ConfigError(f"{message} - at `$.{section}.{name}`") from None
    try:
        cfg = msgspec.convert(data, PolicyConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
    return _check(cfg)
