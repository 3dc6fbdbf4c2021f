"""Policy configuration: SLO classes, classification rules, pools and tenants.

Plain frozen data with working defaults. Parsing a TOML *string* is pure, so it lives
here; reading the file is the caller's business (``broker.config``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import msgspec

from policies.profiles import PROFILES

JOB_KINDS = ("chat", "completion", "embedding")
LIVE_ROUTERS = ("slo", "static")
EVALUATION_ROUTERS = ("oracle", "gpu_only", "accel_only", "round_robin", "jsq", "lowest_latency", "cheapest_first")
"""Routers that exist only to be compared with in the simulator (``evaluation.baselines``): the
oracle reads the simulator's truth, and the others are reference points, not policies to run."""
_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


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
    min_share: float = 0.1
    """Share of each worker's slots kept for this class's lane whenever it has work queued, so
    that more urgent work cannot starve it (:func:`reserved_slots`). Ignored in the most urgent
    lane, which is read first anyway."""
    attainment: float = 0.9
    """Share of the class's jobs that should meet the target."""
    on_unattainable: Literal["best_effort", "shed"] = "shed"
    """Admission (the ``slo`` router): ``shed``, the default, refuses a job at once
    (``rejected``, reason ``slo_unattainable: ...``, a retry-after hint when waiting is the
    cause) when no pool is predicted to serve it within ``routing.shed_margin`` times its TTFT
    (or e2e) target: because it would queue everywhere, or miss even on an idle pool, or miss
    everywhere at the load it would join (see ``policies.slo``). Never before the pools it
    would be refused on have finished a job: until then the predictions are profile guesses.
    ``best_effort`` runs every job anyway, on the pool with the lowest predicted TTFT."""


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


class Endpoint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One OpenAI-compatible server behind a pool (vLLM, SGLang, TGI, a hosted API).

    The API key is never part of the configuration: name the environment variable that holds
    it (``api_key_env``) or a file whose content is the key (``api_key_file``), or neither for
    a server without authentication.
    """

    base_url: str
    """Up to and including the API version, e.g. ``http://gpu-0:8000/v1``."""
    api_key_env: str | None = None
    api_key_file: str | None = None
    """Relative paths are taken from the worker's working directory."""
    models: dict[str, str] = {}
    """Pool model name -> the name this server knows it by. Empty: it serves every model of
    the pool under the pool's names. Otherwise it serves only the models listed."""

    def serves(self, model: str) -> bool:
        """Whether requests for pool model ``model`` may go to this endpoint."""
        return not self.models or model in self.models

    def upstream(self, model: str) -> str:
        """The model name to send this endpoint for pool model ``model``."""
        return self.models.get(model, model)


BackendName = Literal["simulated", "openai", "minilm"]


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
    backend: BackendName = "simulated"
    """What runs the jobs: the simulated device of ``profile``, OpenAI-compatible HTTP
    ``endpoints``, or the in-process MiniLM embedding model."""
    endpoints: tuple[Endpoint, ...] = ()
    """Servers of an ``openai`` pool, used round-robin, skipping those cooling down."""
    request_timeout_s: float = 120.0
    """Longest one HTTP request of an ``openai`` pool may take, streaming included."""
    max_batch: int = 32
    """``minilm``: most texts in one forward pass."""
    max_wait_ms: float = 5.0
    """``minilm``: how long the first job of a batch waits for others to join it."""


class RoutingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which router decides, and how cautiously."""

    policy: str = "slo"
    """``slo``: the cheapest pool predicted to meet the class's target; ``static``: class
    preferences plus backlog. The routers of ``evaluation.baselines`` (``EVALUATION_ROUTERS``)
    run only in the simulator."""
    safety_margin: float = 0.8
    """A pool counts as meeting a target when its prediction is within this share of it."""
    shed_margin: float = 1.0
    """Admission: a job of a ``shed`` class is refused only when the lowest TTFT predicted on any
    pool exceeds this multiple of its target (or an e2e target likewise); between the safety
    margin and this it runs best-effort, so estimate noise does not refuse jobs that would meet it."""


class TenantSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One tenant's share and limits (``[tenants.<name>]``), enforced at admission by
    :class:`policies.tenants.TenantLedger`. Every limit left unset is unlimited."""

    weight: float = 1.0
    """Its share of a contended lane, by tokens served, against the other tenants' weights."""
    jobs_per_s: float | None = None
    """Jobs admitted per second, sustained."""
    tokens_per_min: float | None = None
    """Tokens admitted per minute, sustained: each job counts its prompt tokens plus ``max_tokens``."""
    concurrent: int | None = None
    """Jobs admitted and not yet finished, at once."""
    burst_s: float = 2.0
    """Depth of the rate limits' buckets, in seconds of rate: an idle tenant may send this
    much at once (2 s: 40 jobs for ``jobs_per_s = 20``)."""


class PolicyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the policy worker decides with."""

    classes: dict[str, SLOClass]
    rules: tuple[ClassRule, ...] = ()
    default_class: str = "standard"
    pools: dict[str, PoolSpec]
    default_pool: str = "gpu"
    """Where jobs go when no preferred pool has room: the general-purpose pool."""
    routing: RoutingConfig = RoutingConfig()
    tenants: dict[str, TenantSpec] = {}
    """The deployment's tenants by name: each has its own key space, quotas and weight. None:
    one default space, no quotas (a single-tenant deployment)."""

    @property
    def lanes(self) -> int:
        """Priority lanes of every pool stream: one per distinct class ``priority``."""
        return len({c.priority for c in self.classes.values()})

    def lane(self, slo: str) -> int:
        """The lane of class ``slo``: the rank of its priority among the classes' (0 is the most urgent)."""
        return sorted({c.priority for c in self.classes.values()}).index(self.classes[slo].priority)

    @property
    def lane_shares(self) -> tuple[float, ...]:
        """The slot share each lane keeps (its classes' ``min_share`` summed); 0 for lane 0."""
        shares = [0.0] * self.lanes
        for name, cls in self.classes.items():
            if (lane := self.lane(name)) > 0:
                shares[lane] += cls.min_share
        return tuple(shares)

    def serving(self, model: str, kind: str) -> list[str]:
        """Names of the pools that can run ``model`` jobs of ``kind``, default pool first."""
        names = sorted(self.pools, key=lambda n: n != self.default_pool)
        return [n for n in names if model in self.pools[n].models and kind in self.pools[n].kinds]


def _check(cfg: PolicyConfig) -> PolicyConfig:
    if (policy := cfg.routing.policy) not in LIVE_ROUTERS:
        kind = "an evaluation-only router" if policy in EVALUATION_ROUTERS else "not a router"
        raise ConfigError(f"routing.policy {policy!r} is {kind}: live routing takes {' or '.join(LIVE_ROUTERS)}; "
                          f"the evaluation-only routers ({', '.join(EVALUATION_ROUTERS)}) run in "
                          "`inference-broker simulate --policy NAME`")
    if not 0 < cfg.routing.safety_margin <= cfg.routing.shed_margin:
        raise ConfigError(f"routing: need 0 < safety_margin ({cfg.routing.safety_margin}) <= shed_margin "
                          f"({cfg.routing.shed_margin})")
    if cfg.default_class not in cfg.classes:
        raise ConfigError(f"default_class {cfg.default_class!r} is not one of classes {sorted(cfg.classes)}")
    if cfg.default_pool not in cfg.pools:
        raise ConfigError(f"default_pool {cfg.default_pool!r} is not one of pools {sorted(cfg.pools)}")
    for name, cls in cfg.classes.items():
        if not 0 <= cls.min_share < 1:
            raise ConfigError(f"classes.{name}.min_share must be at least 0 and below 1")
    if sum(cfg.lane_shares) >= 1:
        raise ConfigError(f"the min_share of the classes below the most urgent priority sum to "
                          f"{sum(cfg.lane_shares):g}; they must leave the most urgent ones a share (sum below 1)")
    for i, rule in enumerate(cfg.rules):
        if rule.slo not in cfg.classes:
            raise ConfigError(f"rules[{i}].slo {rule.slo!r} is not one of classes {sorted(cfg.classes)}")
        for kind in rule.kinds:
            if kind not in JOB_KINDS:
                raise ConfigError(f"rules[{i}].kinds: {kind!r} is not one of {JOB_KINDS}")
    for name, pool in cfg.pools.items():
        where = f"pools.{name}"
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: a pool name is 1-32 characters of A-Z a-z 0-9 _ - (it names Redis keys)")
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
        _check_backend(where, pool)
    for name, tenant in cfg.tenants.items():
        _check_tenant(f"tenants.{name}", name, tenant)
    return cfg


def _check_tenant(where: str, name: str, tenant: TenantSpec) -> None:
    if not _NAME.fullmatch(name) or name == "default":
        raise ConfigError(f"{where}: {name!r} is not a tenant name: 1-32 characters of A-Z a-z 0-9 _ - "
                          "(it names Redis keys), and not 'default'")
    for key in ("weight", "jobs_per_s", "tokens_per_min", "burst_s"):
        value = getattr(tenant, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{where}.{key} must be a positive number")
    if tenant.concurrent is not None and tenant.concurrent < 1:
        raise ConfigError(f"{where}.concurrent must be at least 1")


def _env_name(name: str) -> bool:
    return name.isascii() and name.replace("_", "a").isalnum() and not name[0].isdigit()


def _check_backend(where: str, pool: PoolSpec) -> None:
    if pool.backend == "openai" and not pool.endpoints:
        raise ConfigError(f"{where}: backend 'openai' needs at least one [[{where}.endpoints]] entry")
    if pool.backend != "openai" and pool.endpoints:
        raise ConfigError(f"{where}.endpoints: only backend 'openai' uses endpoints (this pool's is "
                          f"{pool.backend!r})")
    if pool.backend == "minilm" and set(pool.kinds) != {"embedding"}:
        raise ConfigError(f"{where}.kinds: backend 'minilm' serves only embeddings; set kinds = [\"embedding\"]")
    if pool.request_timeout_s <= 0:
        raise ConfigError(f"{where}.request_timeout_s must be positive")
    if pool.max_batch < 1:
        raise ConfigError(f"{where}.max_batch must be at least 1")
    if pool.max_wait_ms < 0:
        raise ConfigError(f"{where}.max_wait_ms must not be negative")
    for i, ep in enumerate(pool.endpoints):
        at = f"{where}.endpoints[{i}]"
        if not ep.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{at}.base_url must start with http:// or https://")
        if ep.api_key_env is not None and ep.api_key_file is not None:
            raise ConfigError(f"{at}: set api_key_env or api_key_file, not both")
        # The value is not echoed: a key pasted here by mistake must not end up in logs.
        if ep.api_key_env is not None and not _env_name(ep.api_key_env):
            raise ConfigError(f"{at}.api_key_env must be the *name* of an environment variable "
                              "(letters, digits and _), never the key itself")
        if ep.api_key_file == "":
            raise ConfigError(f"{at}.api_key_file is empty")
        for model in ep.models:
            if model not in pool.models:
                raise ConfigError(f"{at}.models: {model!r} is not one of the pool's models {list(pool.models)}")
    unserved = [m for m in pool.models if pool.endpoints and not any(ep.serves(m) for ep in pool.endpoints)]
    if unserved:
        raise ConfigError(f"{where}: no endpoint serves {unserved}; list them in an endpoint's models, "
                          "or leave an endpoint's models empty to serve all")


def pool_counts(config: PolicyConfig, items: Iterable[str], base: Mapping[str, int]) -> dict[str, int]:
    """Worker counts per pool: ``base`` overridden by ``POOL=N`` items (each may be a comma list)."""
    counts = {pool: base.get(pool, 0) for pool in config.pools}
    for item in (part for text in items for part in text.replace(" ", "").split(",") if part):
        pool, _, n = item.partition("=")
        if pool not in counts or not n.isdigit():
            raise ConfigError(f"{item!r}: expected POOL=N with POOL one of {', '.join(counts)}")
        counts[pool] = int(n)
    return counts


def reserved_slots(shares: Sequence[float], concurrency: int) -> tuple[int, ...]:
    """Slots of a worker that each lane keeps for its own work: ``ceil(share * concurrency)``.

    Rounded up so that a share holds on small workers too (0.1 of 8 slots is 1), unless that
    would leave the most urgent lane no slot: then rounded down (0.1 of 2 slots is none).
    The same rule for live workers (``workers.lanes``) and the simulator.
    """
    up = tuple(math.ceil(share * concurrency - 1e-9) for share in shares)
    if sum(up) < concurrency:
        return up
    return tuple(math.floor(share * concurrency + 1e-9) for share in shares)


def config_from_dict(data: dict[str, Any]) -> PolicyConfig:
    """Validate a parsed TOML document into a :class:`PolicyConfig`.

    Errors name the offending path, e.g. ``Expected `float`, got `str` - at `$.classes.interactive.ttft_ms```.
    """
    # Entries of the name-keyed tables first, so an error names the class or pool
    # (msgspec itself reports dict values as `$.classes[...]`).
    for section, kind in (("classes", SLOClass), ("pools", PoolSpec), ("tenants", TenantSpec)):
        entries = data.get(section)
        if isinstance(entries, dict):
            for name, value in entries.items():
                try:
                    msgspec.convert(value, kind)
                except msgspec.ValidationError as exc:
                    message = str(exc)
                    if message.startswith("Invalid enum value") and message.endswith("`$.backend`"):
                        names = ", ".join(get_args(BackendName))
                        message = message.replace(" - at", f" (expected one of {names}) - at")
                    if "`$" in message:
                        raise ConfigError(message.replace("`$", f"`$.{section}.{name}")) from None
                    raise ConfigError(f"{message} - at `$.{section}.{name}`") from None
    try:
        cfg = msgspec.convert(data, PolicyConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
    return _check(cfg)
