"""Runtime settings: plain frozen data with working defaults, built from the environment.

The environment is read in one place, :func:`Settings.from_env`; everything else gets a
``Settings`` passed in. CLI flags override environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from broker.topology import Topology


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Settings shared by every role. Environment variable names are in brackets."""

    redis_url: str | None = None
    """Redis to use [REDIS_URL]; ``None`` starts an embedded one where a command allows."""
    prefix: str = "ib"
    """Key prefix of this deployment [IB_PREFIX]."""
    config: Path | None = None
    """Policy TOML [IB_CONFIG]; ``None`` uses the built-in default."""
    block_ms: int = 1000
    """Longest blocking read; bounds how long a role takes to notice a stop."""
    batch: int = 256
    """Most entries a policy worker reads and routes per round trip."""
    result_ttl_s: int = 86_400
    """How long results stay retrievable by job id, and how long duplicates are suppressed."""
    heartbeat_s: float = 1.0
    snapshot_s: float = 0.25
    """How often the policy worker refreshes its view of the pools."""
    grace_s: float = 30.0
    """How long a stopping worker lets running jobs finish [IB_GRACE_S]."""

    def __post_init__(self) -> None:
        Topology(self.prefix)  # raises ValueError for an invalid prefix, before anything runs

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``env`` (default: the process environment), then ``overrides``.

        Overrides that are ``None`` are ignored, so CLI options can be passed straight in.
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        if env.get("REDIS_URL"):
            values["redis_url"] = env["REDIS_URL"]
        if env.get("IB_PREFIX"):
            values["prefix"] = env["IB_PREFIX"]
        if env.get("IB_CONFIG"):
            values["config"] = Path(env["IB_CONFIG"])
        if env.get("IB_GRACE_S"):
            values["grace_s"] = float(env["IB_GRACE_S"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
