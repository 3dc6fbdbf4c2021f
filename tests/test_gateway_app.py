"""The gateway app in-process: extensions run in its lifespan, auth before them, errors in OpenAI's format.

No Redis is reached here (nothing becomes a job): what runs on real processes is in test_gateway*.py.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.testclient import TestClient

from broker.client import Client
from broker.config import load_config
from gateway.app import create_app
from gateway.context import Gateway
from gateway.keys import KeyRing, key_line
from policies.config import TenantSpec

KEY = "sk-app-test"


class Echo:
    """An extension: a route that answers the caller's tenant, and a record of its lifespan."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @property
    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/echo", self.echo), Route("/v1/boom", self.boom)]

    async def echo(self, request: Request) -> Response:
        return JSONResponse({"tenant": request.state.tenant})

    async def boom(self, request: Request) -> Response:
        raise RuntimeError("a bug")

    async def start(self) -> None:
        self.events.append("start")

    async def aclose(self) -> None:
        self.events.append("aclose")


def app_with(extension: Echo, keys: KeyRing | None) -> TestClient:
    gateway = Gateway(Client("redis://127.0.0.1:1/0"), config=load_config())  # never connects: no job here
    return TestClient(create_app(gateway, keys=keys, extensions=[extension]), raise_server_exceptions=False)


def test_an_extension_is_started_and_closed_with_the_app_and_its_routes_see_the_keys_tenant() -> None:
    echo = Echo()
    with app_with(echo, KeyRing(KeyRing.entries(key_line(KEY, "acme"), "test"))) as http:
        assert echo.events == ["start"]
        assert http.get("/v1/echo", headers={"authorization": f"Bearer {KEY}"}).json() == {"tenant": "acme"}
        denied = http.get("/v1/echo", headers={"authorization": "Bearer sk-other"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/echo", headers={"authorization": f"Basic {KEY}"}).status_code == 401
    assert echo.events == ["start", "aclose"]


def test_without_keys_every_request_is_tenant_default() -> None:
    with app_with(Echo(), None) as http:
        assert http.get("/v1/echo").json() == {"tenant": "default"}


def test_a_bug_is_a_500_in_openais_format_saying_nothing_of_the_request() -> None:
    with app_with(Echo(), None) as http:
        answer = http.get("/v1/boom")
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "internal_error" and "a bug" not in answer.text


def test_a_configured_tenant_has_one_client_in_its_space_and_any_other_the_default_client() -> None:
    config = msgspec.structs.replace(load_config(), tenants={"acme": TenantSpec(), "beta": TenantSpec()})
    gateway = Gateway(Client("redis://127.0.0.1:1/0", prefix="ib"), config=config)  # never connects
    acme = gateway.client_for("acme")
    assert acme is gateway.client_for("acme") and acme.redis is gateway.client.redis  # one view, shared connections
    assert acme.topo.jobs == "ib:{ib}:~acme:jobs" and acme.topo.reply("batches") == "ib:{ib}:~acme:r:batches"
    for label in ("gamma", "default"):  # not configured (or the default space's own name): the default space
        assert gateway.client_for(label) is gateway.client
    assert [c.topo.tenant for c in gateway.spaces] == ["", "acme", "beta"]
