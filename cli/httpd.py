"""A role's HTTP endpoint: Prometheus metrics, liveness and readiness, on one port.

With ``--metrics-port N`` (``IB_METRICS_PORT``) a policy or pool worker serves, from its
own event loop:

=============  =====================================================================
``/metrics``   the Prometheus text format (:mod:`broker.metrics`, plus ``process_*``)
``/healthz``   liveness: 200 while the event loop runs (it is what answers)
``/readyz``    readiness: 200 when Redis answered a probe (PING; on a cluster, every
               primary) in the last few seconds and the role's consumer groups exist;
               else 503. A short JSON body says why.
=============  =====================================================================

The server is a few lines on :func:`asyncio.start_server` (HTTP/1.1, one request per
connection, GET and HEAD): no web framework in the roles. Readiness is probed in the
background by :class:`Readiness` on a client of its own with short timeouts and no
retries, so a probe never waits behind the role's own retrying connection and a request
never waits on Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from broker import metrics
from broker.connection import CLUSTER_SCHEMES, is_cluster
from broker.errors import BrokerError
from broker.logs import scrub
from broker.settings import Settings
from broker.streams import STOP_TIMEOUT_S

log = logging.getLogger("inference_broker.http")

ScrapeHook = Callable[[], Awaitable[None]]
"""Refreshes gauges that are read from Redis, just before a scrape."""


class Readiness:
    """Whether the role can work: a recent successful Redis probe and its groups in place.

    ``groups`` lists (stream, group) pairs that must exist. Probes run every
    ``interval_s``; one older than ``max_age_s`` no longer counts, so a probe that hangs
    turns the role not-ready too.
    """

    def __init__(self, url: str, groups: Sequence[tuple[str, str]], *, role: str = "role",
                 stop: asyncio.Event | None = None, interval_s: float = 1.0, max_age_s: float = 3.0,
                 timeout_s: float = 1.0) -> None:
        options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                                   "retry": Retry(NoBackoff(), 0)}
        self.client: aioredis.Redis | RedisCluster
        if is_cluster(url):
            parts = urlsplit(url)
            self.client = RedisCluster.from_url(urlunsplit(parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme])),
                                                **options)
        else:
            self.client = aioredis.Redis.from_url(url, **options)
        self.groups = list(groups)
        self.interval_s = interval_s
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self.ok_at: float | None = None
        self.problem = "starting: Redis not probed yet"
        self.stop = stop
        self.role = role
        self._was_ready = False
        metrics.READY.set_function(lambda: 1.0 if self.status()[0] else 0.0)

    def status(self) -> tuple[bool, str]:
        """(ready, why): why is "ok" or what is wrong, fit for an operator."""
        if self.stop is not None and self.stop.is_set():
            return False, "stopping: finishing running work"
        if self.ok_at is None:
            return False, self.problem
        age = time.monotonic() - self.ok_at
        if age > self.max_age_s:
            return False, f"no successful Redis probe for {age:.1f} s (last problem: {self.problem})"
        return True, "ok"

    async def _replies(self) -> list[Any]:
        """PING's reply, then XINFO GROUPS' of each group's stream (an exception where one failed)."""
        if isinstance(self.client, RedisCluster):
            # A cluster has no single PING target: every primary must answer. A cluster's
            # pipeline sends each command to one node, so PING goes on its own.
            try:
                pong: Any = await self.client.ping(target_nodes=RedisCluster.PRIMARIES)  # type: ignore[misc]
            except ResponseError as exc:
                pong = exc
            pipe: Any = self.client.pipeline(transaction=False)
            for stream, _group in self.groups:
                pipe.xinfo_groups(stream)
            return [pong, *(await pipe.execute(raise_on_error=False) if self.groups else [])]
        pipe = self.client.pipeline(transaction=False)
        pipe.ping()
        for stream, _group in self.groups:
            pipe.xinfo_groups(stream)
        return list(await pipe.execute(raise_on_error=False))

    async def probe(self) -> None:
        """One probe: PING and the role's groups (in one round trip on a node)."""
        try:
            replies = await asyncio.wait_for(self._replies(), self.timeout_s * 2)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            self._failed(f"Redis unreachable: {type(exc).__name__}: {exc}".rstrip(": "))
            return
        if isinstance(replies[0], Exception):
            self._failed(f"Redis refused PING: {replies[0]}")
            return
        metrics.REDIS_UP.set(1)
        missing = []
        for (stream, group), reply in zip(self.groups, replies[1:], strict=True):
            names = [] if isinstance(reply, Exception) else [g.get("name") for g in reply]
            if group.encode() not in names:
                missing.append(f"{group} on {stream}")
        if missing:
            self.problem = f"consumer groups missing: {', '.join(missing)}"
            self.ok_at = None
            return
        self.ok_at = time.monotonic()
        self.problem = "ok"

    def _failed(self, why: str) -> None:
        metrics.REDIS_UP.set(0)
        self.ok_at = None
        self.problem = scrub(why)

    async def run(self) -> None:
        """Probe until cancelled; log each change between ready and not."""
        while True:
            await self.probe()
            ready, why = self.status()
            if ready != self._was_ready:
                self._was_ready = ready
                if ready:
                    log.info("%s is ready", self.role)
                elif why != "stopping: finishing running work":
                    log.warning("%s is not ready: %s", self.role, why)
            await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        await self.client.aclose()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class RoleServer:
    """Serves /metrics, /healthz and /readyz for one role (see the module docstring)."""

    def __init__(self, readiness: Readiness, role: str, *, hooks: Sequence[ScrapeHook] = (),
                 hook_timeout_s: float = 2.0) -> None:
        self.readiness = readiness
        self.role = role
        self.hooks = list(hooks)
        self.hook_timeout_s = hook_timeout_s
        self.server: asyncio.Server | None = None
        self._prober: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port listened on (the real one when started on port 0)."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> RoleServer:
        """Listen on ``host:port`` and start probing readiness."""
        self.server = await asyncio.start_server(self._serve, host, port, limit=16384)
        self._prober = asyncio.create_task(self.readiness.run())
        log.info("%s: metrics and health on http://%s:%d/ (/metrics, /healthz, /readyz)", self.role,
                 host, self.port)
        return self

    async def aclose(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            # Python 3.12+ waits here for open connections, and a silent one has 10 s to speak.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), STOP_TIMEOUT_S)
        await self.readiness.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, path = _request_line(head)
            status, ctype, body = await self._respond(method, path)
            writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that went away or sent no complete request: nothing to answer
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def _respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        if not method:
            return _json(400, {"error": "bad request"})
        if method not in ("GET", "HEAD"):
            return _json(405, {"error": f"{method} not allowed; use GET"})
        if path == "/metrics":
            await self._run_hooks()
            return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        if path == "/healthz":
            return _json(200, {"status": "alive", "role": self.role})
        if path == "/readyz":
            ready, why = self.readiness.status()
            return _json(200 if ready else 503, {"ready": ready, "role": self.role, "reason": why})
        if path == "/":
            return 200, "text/plain; charset=utf-8", b"inference-broker: /metrics /healthz /readyz\n"
        return _json(404, {"error": f"no {path}; try /metrics, /healthz or /readyz"})

    async def _run_hooks(self) -> None:
        for hook in self.hooks:
            try:
                await asyncio.wait_for(hook(), self.hook_timeout_s)
            except (RedisError, OSError, TimeoutError) as exc:
                # The gauges keep their last values; /readyz tells whether Redis is away.
                log.debug("gauges not refreshed for this scrape: %s", scrub(str(exc)))


def _request_line(head: bytes) -> tuple[str, str]:
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "", ""
    return parts[0].upper(), parts[1].split("?", 1)[0]


def _json(status: int, body: dict[str, object]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode() + b"\n"


@asynccontextmanager
async def role_endpoint(settings: Settings, role: str, groups: Sequence[tuple[str, str]], stop: asyncio.Event,
                        hooks: Sequence[ScrapeHook] = ()) -> AsyncIterator[RoleServer | None]:
    """Serve the role's endpoint while the block runs, if ``settings.metrics_port`` is set.

    Start it before connecting: /healthz answers and /readyz says why it is not ready
    while the role still waits for Redis. A port already in use is a :class:`BrokerError`.
    """
    if settings.metrics_port is None or settings.redis_url is None:
        yield None
        return
    server = RoleServer(Readiness(settings.redis_url, groups, role=role, stop=stop), role, hooks=hooks)
    try:
        await server.start(settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        await server.aclose()
        raise BrokerError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: "
                          f"{exc.strerror or exc}. Pick a free port with --metrics-port or IB_METRICS_PORT.") from None
    try:
        yield server
    finally:
        await server.aclose()
