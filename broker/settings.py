"""Runtime settings: plain frozen data with working defaults, built from the environment.

The environment is read in one place, :meth:`Settings.from_env`; everything else gets a
``Settings`` passed in. Every field ``name`` can be set with ``IB_<NAME>`` (``REDIS_URL``
for the URL); CLI flags override the environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, TypeVar

import msgspec

from broker.topology import Topology
from broker.wire import StreamName


def _path(kind: type, value: object) -> object:
    if kind is Path and isinstance(value, str | Path):
        return Path(value)
    raise NotImplementedError(kind)


S = TypeVar("S", bound=msgspec.Struct)


def from_env(cls: type[S], var: Callable[[str], str], env: Mapping[str, str] | None,
             overrides: Mapping[str, object], what: str = "setting") -> S:
    """``cls`` (frozen settings) from the variable ``var(field)`` of each field in ``env`` (default:
    the process environment), then ``overrides``.

    Empty variables and ``None`` overrides are ignored, so CLI options pass straight in.
    Raises ``ValueError`` ("invalid <what>: ...", naming the field) when a value does not parse.
    """
    env = os.environ if env is None else env
    values: dict[str, object] = {name: env[var(name)] for name in cls.__struct_fields__ if env.get(var(name))}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(values, cls, strict=False, dec_hook=_path)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid {what}: {exc}") from None


LIVE_BEATS = 5
"""Heartbeat periods after which a role that sent no beat counts as gone."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings shared by every role."""

    redis_url: str | None = None
    """Redis to use [REDIS_URL]; ``None`` starts an embedded one where a command allows. The TLS
    files below are written into its query (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``),
    so every client built from it uses them (broker/tls.py)."""
    redis_tls_ca: Path | None = None
    """CA certificate (PEM) that signed the Redis server's [IB_REDIS_TLS_CA]; with ``rediss://``."""
    redis_tls_cert: Path | None = None
    """This client's certificate (PEM), for a server that requires one (mutual TLS) [IB_REDIS_TLS_CERT]."""
    redis_tls_key: Path | None = None
    """The private key (PEM, unencrypted) of ``redis_tls_cert`` [IB_REDIS_TLS_KEY]."""
    prefix: str = "ib"
    """Key prefix of this deployment [IB_PREFIX]."""
    shards: int = 1
    """Shards of this deployment, each one hash tag, hence one slot of a Redis Cluster
    [IB_SHARDS]; every producer and role of a deployment must agree on it
    (docs/configuration.md)."""
    submit_replicas: int = 0
    """Replicas that must have a submitted job before the SDK's submit returns (``WAIT``)
    [IB_SUBMIT_REPLICAS]. Replication is asynchronous: a failover can lose a job its primary
    acknowledged and had not yet passed on (docs/reliability.md); 0 returns at the primary's word."""
    submit_replicas_ms: int = 1000
    """How long a submit waits for those replicas; past it, the SDK raises ``NotReplicated``."""
    config: Path | None = None
    """Policy TOML [IB_CONFIG]; ``None`` uses the built-in default."""
    block_ms: int = 1000
    """Longest blocking read: bounds how long a role takes to notice a stop."""
    batch: int = 256
    """Most entries a policy worker reads and routes per round trip."""
    result_ttl_s: int = 3600
    """How long a job's result stays retrievable by id, and duplicates of it are suppressed."""
    results_retention_s: int = 3600
    """Result stream entries younger than this are kept even when every group has read them."""
    results_group_idle_s: int = 86_400
    """A consumer group on a result stream that holds back its trimming, and none of whose
    consumers has read for this long, is destroyed: it was abandoned."""
    heartbeat_s: float = 1.0
    heartbeat_expiry_s: float = 60.0
    """A role's heartbeat this old is deleted (the role died without removing it); at least 5 x
    ``heartbeat_s``, the age past which the policy ignores a beat anyway."""
    snapshot_s: float = 0.25
    """How often the policy worker refreshes its view of the pools."""
    grace_s: float = 30.0
    """How long a stopping worker lets running jobs finish [IB_GRACE_S]."""
    claim_idle_ms: int = 30_000
    """An entry pending this long with no lease renewal is taken over by a live peer."""
    claim_interval_s: float = 1.0
    """How often each consumer looks for entries to take over."""
    max_deliveries: int = 5
    """Deliveries after which a job that keeps failing (or killing its worker) is dead-lettered.
    Past it, a job whose last run only died with its worker (no evidence against it) runs
    again in a sandbox, up to ``delivery_cap`` (docs/reliability.md)."""
    delivery_cap: int = 20
    """Deliveries after which a job is dead-lettered even if its runs only ever died with their
    workers: every job ends [IB_DELIVERY_CAP]. Below ``max_deliveries`` it changes nothing."""
    sandboxes: int = 2
    """Suspects (jobs whose worker died under them) a pool worker runs at once, each alone in a
    process of its own beside its other jobs [IB_SANDBOXES]; 0 runs them in-process like any job."""
    retry_backoff_ms: int = 500
    """First retry delay of a failed job; it doubles with each delivery (with jitter)."""
    max_backlog: int = 100_000
    """Submissions fail fast once this many jobs wait on the ingress stream."""
    reply_streams: str = ""
    """Comma-separated reply stream names the default space's jobs may name in ``reply_to``
    [IB_REPLY_STREAMS]; empty: any. With ACL users (``inference-broker acl``), set it to the
    streams the workers' users may write: the policy worker then refuses any other name up
    front, rather than leave a worker unable to answer (docs/security.md). A tenant's jobs may
    name any: every tenant's reply streams are its own."""
    max_job_bytes: int = 1 << 20
    """Larger jobs are refused by the SDK and dead-lettered unread by the policy worker."""
    dead_retention_s: int = 7 * 86_400
    """Dead letters older than this are deleted."""
    dead_max_len: int = 10_000
    """Most dead letters kept; the oldest go first."""
    dead_payload_bytes: int = 16_384
    """Most bytes of the failed entry a dead letter keeps; a longer one is cut (and marked so:
    it cannot be replayed), its reason, error and job id kept."""
    janitor_s: float = 5.0
    """How often result and dead-letter streams are trimmed, and dead consumers and heartbeats removed."""
    fault_injection: bool = False
    """Let job metadata make the simulated device fail or crash (tests and drills only)."""
    metrics_port: int | None = None
    """Port of a role's HTTP endpoint (/metrics, /healthz, /readyz); ``None``: no endpoint."""
    metrics_host: str = "0.0.0.0"
    """Address that endpoint listens on (all interfaces, so Prometheus in another container reaches it)."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as text, or one JSON object per line (ts, level, logger, msg, job_id, trace_id)."""

    @property
    def live_s(self) -> float:
        """A role counts as alive while its last heartbeat is younger than this: a few missed beats
        (a busy event loop, a slow Redis) do not make it look dead."""
        return LIVE_BEATS * self.heartbeat_s

    def __post_init__(self) -> None:
        topo = Topology(self.prefix, self.shards)  # raises ValueError for an invalid prefix or shard count, early
        for name in self.replies:
            try:
                msgspec.convert(name, StreamName)  # what a job's reply_to may be
            except msgspec.ValidationError:
                raise ValueError(f"reply_streams: {name!r} is no stream name (1-64 of A-Z a-z 0-9 _ . -)") from None
            topo.reply(name)  # raises ValueError for a reserved name
        if self.redis_url and (self.redis_tls_ca or self.redis_tls_cert or self.redis_tls_key):
            from broker.tls import tls_url  # raises ValueError for files on a URL without TLS

            msgspec.structs.force_setattr(self, "redis_url", tls_url(
                self.redis_url, ca=self.redis_tls_ca, cert=self.redis_tls_cert, key=self.redis_tls_key))
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port {self.metrics_port} is not a TCP port (0-65535)")
        if self.heartbeat_expiry_s < self.live_s:
            raise ValueError(f"heartbeat_expiry_s ({self.heartbeat_expiry_s}) must be at least {LIVE_BEATS} x "
                             f"heartbeat_s ({self.heartbeat_s}): a live role's heartbeat must not expire between "
                             "its beats")
        if self.claim_idle_ms < 3 * self.block_ms // 2:
            raise ValueError(f"claim_idle_ms ({self.claim_idle_ms}) must be at least 1.5 x block_ms "
                             f"({self.block_ms}): leases are renewed between reads")

    @property
    def replies(self) -> frozenset[str]:
        """The reply stream names of ``reply_streams`` (empty: any name)."""
        return frozenset(name.strip() for name in self.reply_streams.split(",") if name.strip())

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix, self.shards)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``env`` (default: the process environment), then ``overrides``.

        Empty variables and ``None`` overrides are ignored, so CLI options pass straight in.
        Raises ``ValueError`` naming the variable when a value does not parse.
        """
        return from_env(cls, lambda name: "REDIS_URL" if name == "redis_url" else f"IB_{name.upper()}", env, overrides)
