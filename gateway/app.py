"""The gateway's ASGI application: OpenAI routes, authentication, health, metrics, extensions.

::

    gateway = Gateway(Client(url, prefix=..., shards=...), config=load_config())
    app = create_app(gateway, keys=KeyRing(KeyRing.entries(text, "keys.txt")), extensions=[batches])

Every ``/v1/*`` request passes :class:`Auth` first: a ``Bearer`` key from the keys file
sets ``request.state.tenant`` (the job's tenant: identity comes from the key, never from
the body); a missing or unknown key is answered 401 in OpenAI's error format. ``/healthz``,
``/readyz`` and ``/metrics`` are open, as they are on every role.

An extension (the Batch API) brings routes of its own and background work, started and
closed in the app's lifespan, after and before the gateway's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import endpoints
from gateway.context import Gateway, error_response
from gateway.errors import ApiError
from gateway.keys import NO_AUTH_TENANT, KeyRing

log = logging.getLogger("inference_broker.gateway")


class GatewayExtension(Protocol):
    """More routes on the gateway, and background work that lives as long as the app."""

    @property
    def routes(self) -> list[BaseRoute]: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class Probe(Protocol):
    """Readiness (``cli.httpd.Readiness``): probed in the background, read by /readyz."""

    def status(self) -> tuple[bool, str]: ...

    async def run(self) -> None: ...

    async def aclose(self) -> None: ...


class Auth:
    """Pure ASGI middleware (no response buffering, so streams and disconnects pass through)."""

    def __init__(self, app: ASGIApp, keys: KeyRing | None) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        tenant = NO_AUTH_TENANT if self.keys is None else self.keys.tenant(_bearer(scope))
        if tenant is None:
            error = ApiError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'; "
                                  "ask the operator for one", type="invalid_request_error", code="invalid_api_key")
            await error_response(error)(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def _bearer(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" else ""
    return ""


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "alive", "role": "gateway"})


async def readyz(request: Request) -> Response:
    gateway, probe = Gateway.of(request), request.app.state.probe
    ready, why = (False, "stopping: finishing in-flight requests") if gateway.draining else \
        probe.status() if probe is not None else (True, "ok")
    return JSONResponse({"ready": ready, "role": "gateway", "reason": why}, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def models(request: Request) -> Response:
    return JSONResponse(Gateway.of(request).catalog.body())


def create_app(gateway: Gateway, *, keys: KeyRing | None, probe: Probe | None = None,
               extensions: Sequence[GatewayExtension] = ()) -> Starlette:
    """The gateway's app. ``keys`` None serves every request as tenant ``default`` (``--no-auth``)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        prober = asyncio.create_task(probe.run()) if probe is not None else None
        started: list[GatewayExtension] = []
        try:
            for extension in extensions:
                await extension.start()
                started.append(extension)
            yield
        finally:
            gateway.draining = True
            for extension in reversed(started):
                await extension.aclose()
            if prober is not None:
                prober.cancel()
                await asyncio.gather(prober, return_exceptions=True)
            if probe is not None:
                await probe.aclose()
            await gateway.client.aclose()

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", endpoints.OpenAIEndpoint("chat"), methods=["POST"]),
        Route("/v1/completions", endpoints.OpenAIEndpoint("completion"), methods=["POST"]),
        Route("/v1/embeddings", endpoints.OpenAIEndpoint("embedding"), methods=["POST"]),
        *(route for extension in extensions for route in extension.routes),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        ApiError: _api_error, 404: _not_found, 405: _not_allowed, Exception: _internal})
    app.state.gateway = gateway
    app.state.probe = probe
    app.add_middleware(Auth, keys=keys)
    return app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _internal(request: Request, exc: Exception) -> Response:
    # Starlette logs the traceback; the client gets OpenAI's format, and nothing of the request.
    return error_response(ApiError(500, "the gateway failed to answer; its log has the details", type="server_error",
                                   code="internal_error"))


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(404, f"no route {request.method} {request.url.path}; the gateway serves "
                                        "/v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models",
                                   code="unknown_url"))


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                   code="method_not_allowed"))
