"""Connections to Redis, and what their errors mean.

``connect`` builds a client whose connections fail fast on a wrong URL (TLS against a
plaintext port and the reverse, bad credentials, TLS files or certificates that cannot work:
broker/tls.py) with one line saying what to fix, send
commands with hiredis packing and cancel cleanly; the error tuples say which failures a
role waits out and retries rather than exits on.

(redis-py types asyncio commands as ``Awaitable[T] | T``; the few ``type: ignore[misc]``
comments on awaited commands in this project are for that.)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    DefaultParser,
    RedisSSLContext,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterError,
    DataError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.errors import RedisMisconfigured, RedisUnavailable
from broker.tls import TlsFiles, no_password, refusal, refused, untrusted, url_problem

log = logging.getLogger("inference_broker")
T = TypeVar("T")


def redacted(url: str) -> str:
    """``url`` without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None and "password" not in parts.query:  # ssl_password too
        return url
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=(f"{parts.username}:***@" if parts.username else "***@") + host)
    if "password" in parts.query:
        query = [(k, "***" if k in ("password", "ssl_password") else v)
                 for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="*/:~"))  # paths stay readable
    return urlunsplit(parts)


class _HiredisPacking:
    """Packs commands with hiredis' C encoder instead of redis-py's Python loop.

    redis-py's synchronous client does this already; its asyncio connections do not, and
    packing was a sixth of a policy worker's CPU (bench/PROFILE.md): about 5.4 µs per
    routed job's command against 0.8 µs here.
    """

    def pack_command(self, *args: object) -> list[bytes]:
        # As redis-py: a command name with spaces ("XINFO GROUPS") is several arguments.
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]  # type: ignore[arg-type]
        except TypeError as exc:  # None, bool, a list: what redis-py's encoder refuses too
            # Not the arguments themselves: they may hold a job's payload or a password.
            raise DataError(f"cannot send {args[0]!r} to Redis: {exc}") from None


class _CancellableSend(AbstractConnection):
    """Sends under ``asyncio.timeout`` rather than redis-py's ``asyncio.wait_for``.

    In Python 3.11, ``wait_for`` runs the send as a task of its own, and when its caller is
    cancelled just as that task finishes, it returns as if nothing had happened (fixed in
    3.12). The cancellation is lost: a consumer loop told to stop that way reads on forever.
    ``wait_for`` also cost a task per command.
    """

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        try:
            await self._send(command, check_health)
        except RuntimeError as exc:
            # uvloop raises RuntimeError, not an OSError, for a write on a transport already
            # closed (a cluster node killed under a pipeline); redis-py then passes it on as it
            # is, and it would stop a role. It is a lost connection, retried like one.
            if "closed" not in str(exc):
                raise
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error writing to socket: {exc}") from None

    async def _send(self, command: bytes | str | Iterable[bytes], check_health: bool) -> None:
        timeout = self.socket_timeout
        if not timeout:
            return await super().send_packed_command(command, check_health)
        self.socket_timeout = None  # redis-py sends without wait_for; the timeout is this one
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        finally:
            self.socket_timeout = timeout


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, innermost last."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _find(exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
    return next((e for e in _causes(exc) if isinstance(e, kind)), None)


def misconfigured(exc: BaseException) -> RedisMisconfigured | None:
    """The :class:`RedisMisconfigured` behind ``exc``, if a connection attempt proved one."""
    found = _find(exc, RedisMisconfigured)
    return found if isinstance(found, RedisMisconfigured) else None


TIMEOUTS = (TimeoutError, RedisTimeoutError)

SERVER_REPLIES = (AuthenticationError, AuthorizationError, BusyLoadingError)
"""``ConnectionError`` classes redis-py raises for an error *reply* of the server."""


PROBE_S = 2.0
"""Seconds a probe of the other protocol (TLS or plaintext) may take."""
ALERT_S = 1.0
"""Seconds a probe waits, after a TLS handshake, for the alert of a server refusing the client."""


async def _speaks_tls(host: str, port: int) -> bool:
    """Whether a TLS handshake (certificate unchecked) succeeds on ``host:port``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(PROBE_S):
            _reader, writer = await asyncio.open_connection(host, port, ssl=context)
    except (OSError, TimeoutError):
        return False
    writer.transport.abort()
    return True


async def _speaks_plaintext(host: str, port: int) -> bool:
    """Whether ``host:port`` answers a plaintext PING as Redis does (``+PONG``, or an error reply)."""
    writer = None
    try:
        async with asyncio.timeout(PROBE_S):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"PING\r\n")
            # A TLS server answers with a TLS alert record or closes; never with "+" or "-".
            return (await reader.read(1)) in (b"+", b"-")
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.transport.abort()


async def misconfiguration(exc: BaseException, host: str, port: int, *, tls: bool, connected: bool,
                           tls_context: RedisSSLContext | None = None) -> str | None:
    """Why connecting to ``host:port`` can never work, when ``exc`` (and a probe) prove it; else None.

    ``connected``: the TCP (and TLS) connection was made and the first command failed.
    ``tls_context``: the TLS client's settings (its CA, certificate and key files).
    Only positive evidence counts (a file that does not load, a certificate refused, the
    other protocol answering): a server that is down or restarting is not misconfigured,
    and is waited for as before.
    """
    where = f"Redis at {host}:{port}"
    files = TlsFiles(*(getattr(tls_context, name, None) for name in ("ca_certs", "certfile", "keyfile", "password")))
    if tls and (problem := files.problem()):
        return problem  # checked first: redis-py loads the files as it connects, and fails alike
    ssl_error = _find(exc, ssl.SSLError)
    if isinstance(ssl_error, ssl.SSLCertVerificationError):
        return untrusted(ssl_error, where, host, files)
    if _find(exc, (ConnectionRefusedError, socket.gaierror)) is not None:
        return None  # nothing listens there, or no such host: the usual "unreachable"
    if tls:
        if (ssl_error is not None or not connected) and await _speaks_plaintext(host, port):
            return f"{where} does not speak TLS; try: a redis:// URL instead of rediss://"
        closed = (ssl.SSLEOFError, ssl.SSLZeroReturnError)  # the connection closed, saying nothing
        alert = ssl_error if isinstance(ssl_error, ssl.SSLError) and not isinstance(ssl_error, closed) else None
        if alert is None and connected and tls_context is not None and _find(exc, TIMEOUTS) is None:
            # The handshake passed and the first command found the connection closed: perhaps a
            # refusal of this client's certificate whose alert a reset lost (see tls.refusal).
            alert = await refusal(host, port, tls_context.get(), ALERT_S)
            if isinstance(alert, ssl.SSLCertVerificationError):
                return untrusted(alert, where, host, files)
        return refused(alert, where, files) if alert is not None else None
    if connected and await _speaks_tls(host, port):
        return f"{where} accepts only TLS connections; try: a rediss:// URL instead of redis://"
    return None


class _FailFast(AbstractConnection):
    """Fails a connection that can never work at its first attempt, saying why.

    A TLS client on a plaintext port, a plaintext client on a TLS port and an untrusted
    certificate fail the same way on every attempt; redis-py retried them with backoff for
    up to 30 s before a bare "connection reset" or "timeout". When :func:`misconfiguration`
    proves such a mismatch, the attempt raises :class:`RedisMisconfigured`, which
    :class:`_Retry` does not retry.
    """

    host: str
    port: int

    async def _diagnose(self, exc: BaseException, *, connected: bool) -> None:
        tls_context = self.ssl_context if isinstance(self, SSLConnection) else None
        reason = await misconfiguration(exc, self.host, int(self.port), tls=tls_context is not None,
                                        connected=connected, tls_context=tls_context)
        if reason:
            raise RedisMisconfigured(reason) from exc

    async def _connect(self) -> None:
        try:
            await super()._connect()  # type: ignore[no-untyped-call, safe-super]
        except (OSError, TimeoutError) as exc:
            await self._diagnose(exc, connected=False)
            raise

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        try:
            await super().on_connect_check_health(check_health)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # A reply (wrong password, loading, too many clients) proves the protocols match.
            if not isinstance(exc, SERVER_REPLIES):
                await self._diagnose(exc, connected=True)
            raise


class _Retry(Retry):
    """Retries what may pass (a lost connection, a timeout), never a :class:`RedisMisconfigured`."""

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any],
                              is_retryable: Callable[[Exception], bool] | None = None,
                              with_failure_count: bool = False) -> T:
        def retryable(error: Exception) -> bool:
            # redis-py wraps what a connect raises in another ConnectionError: look at the causes.
            return misconfigured(error) is None and (is_retryable is None or is_retryable(error))

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


class _FastConnection(_HiredisPacking, _CancellableSend, _FailFast, Connection):
    pass


class _FastSSLConnection(_HiredisPacking, _CancellableSend, _FailFast, SSLConnection):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.ssl_context.password is None:
            self.ssl_context.password = no_password  # type: ignore[assignment]


class _FastUnixConnection(_HiredisPacking, _CancellableSend, UnixDomainSocketConnection):
    pass


_FAST: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _FastConnection, SSLConnection: _FastSSLConnection, UnixDomainSocketConnection: _FastUnixConnection}


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes that name a Redis Cluster (any of its nodes), and the node scheme each stands for."""


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def connect(url: str, block_ms: int = 1000) -> aioredis.Redis:
    """A client for ``url`` that retries dropped connections with jittered backoff.

    The socket timeout exceeds the longest blocking read, so a quiet ``XREADGROUP BLOCK``
    is never mistaken for a dead connection. Commands are packed in C (hiredis), and a
    cancelled caller is never left running (see ``_CancellableSend``).

    A cluster URL (:func:`is_cluster`) gives redis-py's cluster client, which follows MOVED
    and ASK, learns the slots again after a failover and splits a pipeline by node. It is
    typed here as the node client: every command this project sends takes keys of one slot
    (each shard's keys share a hash tag), and the suites run on both (tests/deployments.py).

    TLS options are the URL's ``ssl_*`` query parameters (:mod:`broker.tls`); one that
    redis-py would refuse raises :class:`RedisMisconfigured` here, saying which.
    """
    if problem := url_problem(url):
        raise RedisMisconfigured(problem)
    options: dict[str, Any] = {
        "socket_timeout": block_ms / 1000 + 10, "socket_connect_timeout": 5, "socket_keepalive": True,
        "health_check_interval": 30, "retry": _Retry(ExponentialWithJitterBackoff(cap=2.0, base=0.05), retries=5),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError]}
    parts = urlsplit(url)
    if parts.scheme in CLUSTER_SCHEMES:
        cluster = RedisCluster.from_url(urlunsplit(parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme])), **options)
        # One dict of connection options serves every node the client learns of (NodesManager).
        kwargs = cluster.connection_kwargs
        kwargs["connection_class"] = _FAST.get(kwargs["connection_class"], kwargs["connection_class"])
        kwargs["parser_class"] = _Parser
        for node in cluster.startup_nodes:
            node.connection_class = kwargs["connection_class"]
            node.connection_kwargs["parser_class"] = _Parser
        return cast(aioredis.Redis, cluster)
    client = aioredis.Redis.from_url(url, parser_class=_Parser, **options)
    pool = client.connection_pool
    pool.connection_class = _FAST.get(pool.connection_class, pool.connection_class)
    return client


async def queue_wait(client: aioredis.Redis, pipe: Pipeline, key: str, replicas: int, timeout_ms: int) -> None:
    """Queue ``WAIT replicas timeout_ms`` on ``pipe`` after the writes queued there to ``key``'s node.

    WAIT counts the replicas that acknowledged the writes made *on its own connection*, so it
    must travel with them: a node's pipeline is one connection; a cluster's sends the commands
    of each node on one connection, and a keyless WAIT goes to the node named here (the one
    serving ``key``'s slot). Should the slot move before the pipeline runs, the write is
    redirected and the WAIT fails with the old node, rather than counting replicas of nothing.
    """
    if isinstance(client, RedisCluster):
        await client.initialize()  # learns the slots on first use; after that, a flag check
        node = client.get_node_from_key(key)
        pipe.execute_command("WAIT", replicas, timeout_ms, target_nodes=node)
    else:
        pipe.execute_command("WAIT", replicas, timeout_ms)


def unreachable(url: str, exc: BaseException, after_s: float | None = None) -> str:
    """One line: why Redis at ``url`` cannot be reached (``exc``), and what to try."""
    if found := misconfigured(exc):
        return str(found)
    if _find(exc, ConnectionRefusedError) is not None:
        why = "connection refused: nothing listens there"
    elif _find(exc, socket.gaierror) is not None:
        why = "its host name does not resolve"
    elif _find(exc, TIMEOUTS) is not None:
        why = "no answer in time"
    else:
        why = str(exc)
    state = f"was unreachable for {after_s:.0f} s" if after_s is not None else "is unreachable"
    return (f"Redis at {redacted(url)} {state} ({why}); try: start Redis there "
            "(or `inference-broker up` for a local one), or fix --redis-url / REDIS_URL")


async def wait_ready(client: aioredis.Redis, url: str, timeout: float = 30.0) -> None:
    """Wait until Redis answers PING, or raise :class:`RedisUnavailable` saying what to do.

    A server that is down or still starting is waited for (saying so once, at once); a
    wrong password or a URL that can never work against the server (TLS on one side
    only, an untrusted certificate) fails at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.05
    warned = False
    while True:
        try:
            await client.ping()  # type: ignore[misc]
            return
        except AuthenticationError as exc:
            # Waiting does not fix a wrong password: say so at once (without the password).
            raise RedisUnavailable(
                f"Redis at {redacted(url)} refused the credentials ({exc}). Check the user and password "
                "in --redis-url / REDIS_URL.") from None
        except (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException) as exc:
            # The cluster client raises RedisClusterException when no startup node answers.
            if misconfigured(exc) is not None or loop.time() + delay > deadline:
                raise RedisUnavailable(unreachable(url, exc, None if misconfigured(exc) else timeout)) from None
            if not warned:
                log.warning("waiting up to %.0f s for Redis: %s", timeout, unreachable(url, exc))
                warned = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


class Refused(ResponseError):
    """Redis refused a command for now: a blocked read cut short by a change of role
    (``UNBLOCKED``), a script running too long (``BUSY``), a disk it cannot persist to
    (``MISCONF``), too few replicas (``NOREPLICAS``)."""


class _Parser(DefaultParser):  # type: ignore[valid-type,misc]
    """The reply parser, with the refusals above as :class:`Refused` (redis-py: plain ResponseError)."""

    EXCEPTION_CLASSES = {**DefaultParser.EXCEPTION_CLASSES,
                         **dict.fromkeys(("UNBLOCKED", "BUSY", "MISCONF", "NOREPLICAS"), Refused)}


TRANSIENT = (OutOfMemoryError, ReadOnlyError, MasterDownError, TryAgainError, ClusterError, RedisClusterException,
             Refused)
"""Refusals that pass by themselves or once an operator acts: out of memory (``maxmemory`` with
``noeviction``), a replica during a failover, a cluster resharding or down, and :class:`Refused`.

redis-py's cluster client raises ``RedisClusterException`` (not a ``RedisError``) while a
failover leaves a slot without a known node, or when no node answers; ``ClusterError`` when
its redirections and retries ran out. Both pass once the cluster has a primary for every slot.
(It also raises ``RedisClusterException`` for a command whose keys span slots, a bug here that
the cluster suites would show: no key layout of this project does that.)"""


RETRYABLE = (RedisConnectionError, RedisTimeoutError, OSError, *TRANSIENT)
"""Errors after which a role waits and tries again rather than exiting."""


OUT_OF_MEMORY = ("Redis is out of memory (used_memory over maxmemory, with noeviction) and refuses "
                 "writes; free memory (drain or purge backlogs, lower the retention settings) or raise "
                 "maxmemory")
"""What to tell an operator when Redis refuses a write for want of memory."""


def unavailable(exc: BaseException) -> str:
    """What a retryable error means, for a log line."""
    if isinstance(exc, OutOfMemoryError):
        return OUT_OF_MEMORY
    if isinstance(exc, TRANSIENT):
        return f"Redis refuses the command for now ({type(exc).__name__}: {exc})"
    return f"Redis unreachable ({exc})"
