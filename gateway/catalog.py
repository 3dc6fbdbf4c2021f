"""What the gateway serves, from the policy config: its endpoints, models and service tiers. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec

from gateway.errors import ApiError
from policies.config import PolicyConfig

Endpoint = Literal["chat", "completion", "embedding"]
"""The OpenAI endpoints, named for the kind of job each becomes."""
Tier = Literal["auto", "default", "flex", "priority", "scale"]
"""OpenAI's ``service_tier`` values."""


class Tiers(msgspec.Struct, frozen=True):
    """OpenAI's ``service_tier`` mapped onto the policy's SLO classes.

    A tier maps to a class (sent as the job's SLO hint) or to None (no hint: the policy's
    rules decide). By default ``priority`` is the most urgent class, ``flex`` the ``batch``
    class (else the least urgent), ``default`` and ``auto`` leave it to the rules.
    """

    slo_of: dict[str, str | None]
    classes: frozenset[str]

    @classmethod
    def of(cls, config: PolicyConfig, overrides: Mapping[str, str | None] | None = None) -> Tiers:
        """The default mapping for ``config``, with ``overrides`` (tier -> class or None) applied."""
        urgency = sorted(config.classes, key=lambda name: config.classes[name].priority)
        slo_of: dict[str, str | None] = {"auto": None, "default": None, "priority": urgency[0],
                                         "flex": "batch" if "batch" in config.classes else urgency[-1], "scale": None}
        for tier, slo in (overrides or {}).items():
            if slo is not None and slo not in config.classes:
                raise ValueError(f"service tier {tier!r} maps to {slo!r}, not a class of the policy "
                                 f"({', '.join(sorted(config.classes))})")
            slo_of[tier] = slo
        return cls(slo_of=slo_of, classes=frozenset(config.classes))

    def hint(self, tier: str | None, header: str | None = None) -> str | None:
        """The SLO hint of a request: the ``X-IB-SLO`` header's class, else its tier's."""
        if header is not None:
            if header not in self.classes:
                raise ApiError(400, f"X-IB-SLO: {header!r} is not an SLO class of this broker; use one of "
                                    f"{', '.join(sorted(self.classes))}", code="invalid_slo_class")
            return header
        return self.slo_of.get(tier or "default")

    def applied(self, slo: str | None) -> str:
        """The tier reported for a job served in class ``slo``: the first tier mapping to it, else default."""
        return next((tier for tier in ("priority", "flex") if slo is not None and self.slo_of.get(tier) == slo),
                    "default")


class Catalog(msgspec.Struct, frozen=True):
    """The models of the policy config and the endpoints each serves (GET /v1/models)."""

    kinds: dict[str, frozenset[str]]
    owner: str = "inference-broker"

    @classmethod
    def of(cls, config: PolicyConfig) -> Catalog:
        kinds: dict[str, set[str]] = {}
        for pool in config.pools.values():
            for model in pool.models:
                kinds.setdefault(model, set()).update(pool.kinds)
        return cls(kinds={model: frozenset(k) for model, k in sorted(kinds.items())})

    def check(self, model: str, endpoint: Endpoint) -> None:
        served = self.kinds.get(model)
        if served is None:
            raise ApiError(404, f"The model '{model}' does not exist; GET /v1/models lists those served",
                           param="model", code="model_not_found")
        if endpoint not in served:
            raise ApiError(400, f"model '{model}' does not serve {endpoint} requests (it serves "
                                f"{', '.join(sorted(served))})", param="model", code="model_not_supported")

    def body(self, created: int = 0) -> dict[str, object]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": self.owner}
                                           for model in self.kinds]}
