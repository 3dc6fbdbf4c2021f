"""What every route of the gateway shares, and how an :class:`ApiError` is answered."""

from __future__ import annotations

import math

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse

from broker.client import Client
from gateway.catalog import Catalog, Tiers
from gateway.errors import ApiError
from policies.config import PolicyConfig


class Options(msgspec.Struct, frozen=True, kw_only=True):
    """How the gateway treats each request (``GatewaySettings`` fills them from flags and env)."""

    request_timeout_s: float = 600.0
    """Longest a request waits for its job when the client sets no timeout of its own."""
    max_body_bytes: int = 2 << 20
    """Larger request bodies are refused with 413 before they are read whole."""
    backpressure_retry_s: float = 1.0
    """Retry-After of a 429 for a full ingress backlog."""


class Gateway:
    """What every route shares: the SDK client, the tier mapping, the served models, the options.

    ``client`` is in the deployment's default space; :meth:`client_for` gives the client of a
    request's tenant, in the tenant's own space when the policy config has one for it.
    """

    def __init__(self, client: Client, *, config: PolicyConfig, tiers: Tiers | None = None,
                 options: Options | None = None) -> None:
        self.client = client
        self.config = config
        self.tiers = tiers or Tiers.of(config)
        self.catalog = Catalog.of(config)
        self.options = options or Options()
        self.draining = False
        self._views: dict[str, Client] = {}

    def client_for(self, tenant: str) -> Client:
        """The client that serves ``tenant``'s jobs: a view of :attr:`client` in the tenant's space
        when ``[tenants]`` names it (made once, sharing the connections and result listeners),
        else :attr:`client` itself (the default space, where the tenant is a label on the job).

        A configured tenant's job must go to its own ingress: on the default one the policy
        worker dead-letters it as ``forged_tenant``.
        """
        if tenant not in self.config.tenants:
            return self.client
        view = self._views.get(tenant)
        if view is None:
            view = self._views[tenant] = self.client.as_tenant(tenant)
        return view

    @property
    def spaces(self) -> list[Client]:
        """A client in every space the gateway serves: the default one, then each configured tenant's."""
        return [self.client, *(self.client_for(tenant) for tenant in sorted(self.config.tenants))]

    @staticmethod
    def of(request: Request) -> Gateway:
        """The gateway serving ``request`` (the Batch API's routes reach it this way too)."""
        found: Gateway = request.app.state.gateway
        return found


def error_response(error: ApiError) -> JSONResponse:
    headers = {"retry-after": str(max(1, math.ceil(error.retry_after_s)))} if error.retry_after_s is not None else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)
