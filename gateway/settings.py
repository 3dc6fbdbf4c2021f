"""The gateway's settings: plain frozen data with working defaults, built from the environment.

As :class:`broker.settings.Settings`: read from the environment in one place
(:meth:`GatewaySettings.from_env`, each field ``name`` from ``IB_GATEWAY_<NAME>``), CLI
flags over it. The deployment's own settings (Redis, prefix, shards, backlog) stay in
``Settings``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgspec

from broker.settings import from_env
from gateway.catalog import Tiers
from gateway.context import Options
from gateway.keys import KeyRing
from policies.config import PolicyConfig


def gateway_var(name: str) -> str:
    """The environment variable of the gateway's setting ``name``."""
    return f"IB_GATEWAY_{name.upper()}"


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the gateway listens, whom it lets in, and how long it waits."""

    host: str = "127.0.0.1"
    """Address to listen on [IB_GATEWAY_HOST]; 0.0.0.0 for every interface (in a container)."""
    port: int = 8000
    """TCP port [IB_GATEWAY_PORT]; 0 picks a free one (the log line says which)."""
    keys_file: Path | None = None
    """API keys, one ``<sha256 hex> <tenant>`` per line [IB_GATEWAY_KEYS_FILE]."""
    keys: str | None = None
    """The same lines, separated by newlines or commas [IB_GATEWAY_KEYS]."""
    no_auth: bool = False
    """Serve without API keys, every request as tenant ``default`` [IB_GATEWAY_NO_AUTH]."""
    grace_s: float = 30.0
    """On SIGTERM, how long in-flight requests may take to finish before they are cut [IB_GATEWAY_GRACE_S]."""
    request_timeout_s: float = 600.0
    """Longest a request waits for its job when its client sets no timeout [IB_GATEWAY_REQUEST_TIMEOUT_S]."""
    max_body_bytes: int = 2 << 20
    """Larger request bodies are refused with 413 [IB_GATEWAY_MAX_BODY_BYTES]."""
    tiers: str = ""
    """``service_tier`` mapping over the default, e.g. ``priority=interactive,flex=batch,default=``
    (an empty class: no hint, the policy's rules decide) [IB_GATEWAY_TIERS]."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"gateway port {self.port} is not a TCP port (0-65535)")
        if self.grace_s < 0 or self.request_timeout_s <= 0 or self.max_body_bytes < 1:
            raise ValueError("gateway grace_s must be >= 0, request_timeout_s and max_body_bytes positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> GatewaySettings:
        """Settings from ``env`` (default: the process environment), then ``overrides`` (None ones ignored)."""
        return from_env(cls, gateway_var, env, overrides, "gateway setting")

    def keyring(self) -> KeyRing | None:
        """The accepted keys (None with ``no_auth``). Raises ValueError when none are configured."""
        if self.no_auth:
            if self.keys_file is not None or self.keys:
                raise ValueError("API keys and --no-auth (IB_GATEWAY_NO_AUTH) are both set: drop one "
                                 "(with keys, set IB_GATEWAY_NO_AUTH=false)")
            return None
        texts = []
        if self.keys_file is not None:
            try:
                texts.append((self.keys_file.read_text(encoding="utf-8"), str(self.keys_file)))
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read the keys file {self.keys_file}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from None
        if self.keys:
            texts.append((self.keys, "IB_GATEWAY_KEYS"))
        ring = KeyRing([entry for text, source in texts for entry in KeyRing.entries(text, source)])
        if not len(ring):
            raise ValueError("no API keys configured: pass --keys-file FILE or set IB_GATEWAY_KEYS (lines from "
                             "`inference-broker gateway hash-key`), or --no-auth to serve without keys")
        return ring

    def tier_map(self, config: PolicyConfig) -> Tiers:
        """The service tier mapping for ``config``, ``tiers`` applied. Raises ValueError for a bad one."""
        overrides: dict[str, str | None] = {}
        for item in filter(None, (part.strip() for part in self.tiers.split(","))):
            tier, eq, slo = item.partition("=")
            if not eq or tier not in ("auto", "default", "flex", "priority", "scale"):
                raise ValueError(f"gateway tiers: {item!r} is not TIER=CLASS with TIER one of auto, default, "
                                 "flex, priority, scale")
            overrides[tier] = slo or None
        return Tiers.of(config, overrides)

    def options(self) -> Options:
        return Options(request_timeout_s=self.request_timeout_s, max_body_bytes=self.max_body_bytes)
