"""Test harness: a real redis-server per session, a key prefix per test, role processes.

Every test that claims Redis behaviour talks to a real ``redis-server`` started here on a
free loopback port (never a server that happens to be running, never a fake). Tests are
isolated by key prefix rather than by FLUSHALL, so one server serves the whole session.
A missing redis-server skips locally and fails in CI (``CI`` set).

The core suites run twice, on that server and on a local 3-primary Redis Cluster with a
deployment of 3 shards, from the same tests: see ``tests/deployments.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import uvloop

from broker.connection import connect
from broker.errors import EmbeddedRedisError
from broker.settings import Settings
from broker.topology import Topology
from cli.cluster import EmbeddedCluster
from cli.embedded import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent

def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    # Run async tests on uvloop, as the roles do in production.
    return {"uvloop": uvloop.new_event_loop}

def _start(**kwargs: object) -> EmbeddedRedis:
    try:
        return EmbeddedRedis(**kwargs).start()  # type: ignore[arg-type]
    except EmbeddedRedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs a redis-server: {exc}")
        pytest.skip(f"no redis-server: {exc}")

@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One real redis-server for the session (AOF on, like the embedded default)."""
    server = _start()
    yield server
    server.stop()

@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedCluster]:
    """One real local Redis Cluster of 3 primaries for the session, started on first use."""
    try:
        cluster = EmbeddedCluster(primaries=3).start()
    except EmbeddedRedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs a redis-server with cluster support: {exc}")
        pytest.skip(f"no local Redis Cluster: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture
def where() -> str:
    """Where the test's deployment runs: ``node``, unless the test runs on both (``ON_BOTH``)."""
    return "node"


@pytest.fixture
def redis_url(where: str, request: pytest.FixtureRequest) -> str:
    """The URL of the test's Redis: the session's server, or the session's cluster."""
    server: EmbeddedRedis | EmbeddedCluster = request.getfixturevalue(
        "redis_cluster" if where == "cluster" else "redis_server")
    return server.url


@pytest.fixture
def shards(where: str) -> int:
    """The deployment's shard count: one on a node, one per primary on the cluster."""
    return 3 if where == "cluster" else 1

@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own: its streams, groups and keys touch no other test's."""
    return f"t{uuid.uuid4().hex[:10]}"

@pytest.fixture
def topo(prefix: str, shards: int) -> Topology:
    """The test deployment's keys (shard 0's; ``topo.every_shard`` and ``topo.of_job`` for the rest)."""
    return Topology(prefix, shards)

@pytest.fixture
def settings(redis_url: str, prefix: str, shards: int) -> Settings:
    return Settings(redis_url=redis_url, prefix=prefix, shards=shards, block_ms=200, snapshot_s=0.05,
                    heartbeat_s=0.2, grace_s=5.0)

@pytest_asyncio.fixture
async def client(redis_url: str, where: str) -> AsyncIterator[aioredis.Redis]:
    """A raw redis-py client on the test's Redis (redis-py's cluster client on the cluster)."""
    c = connect(redis_url) if where == "cluster" else aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()

FAST_ENV = {
    # Short reliability timings for fault tests: takeover after 1 s idle, checked every
    # 0.2 s; reads block 0.2 s; dead-letter after 3 deliveries; fault injection on.
    "IB_CLAIM_IDLE_MS": "1000",
    "IB_CLAIM_INTERVAL_S": "0.2",
    "IB_BLOCK_MS": "200",
    "IB_MAX_DELIVERIES": "3",
    "IB_RETRY_BACKOFF_MS": "100",
    "IB_JANITOR_S": "0.5",
    "IB_HEARTBEAT_S": "0.2",
    "IB_SNAPSHOT_S": "0.05",
    "IB_FAULT_INJECTION": "1",
}


class Roles:
    """Starts broker roles as separate OS processes and kills whatever is left at teardown."""

    def __init__(self, url: str, prefix: str, log_dir: Path, shards: int = 1) -> None:
        self.url = url
        self.prefix = prefix
        self.log_dir = log_dir
        self.shards = shards
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``python -m cli <args> --redis-url URL --prefix P --shards S`` with output in a log file."""
        log = open(self.log_dir / f"{args[0]}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *args, *self.options],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=ROOT)
        log.close()
        self.procs.append(proc)
        return proc

    @property
    def options(self) -> list[str]:
        """The options that point a command at this deployment (one shard: IB_SHARDS may say more)."""
        shards = ["--shards", str(self.shards)] if self.shards > 1 else []
        return ["--redis-url", self.url, "--prefix", self.prefix, *shards]

    def policy(self) -> subprocess.Popen[bytes]:
        return self.start("policy")

    def worker(self, pool: str, *extra: str) -> subprocess.Popen[bytes]:
        return self.start("worker", "--pool", pool, "--grace", "5", *extra)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))

    def stop_all(self) -> list[int]:
        """SIGTERM every role still running and return their exit codes."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=15))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes

@pytest.fixture
def roles(redis_url: str, prefix: str, shards: int, tmp_path: Path,
          request: pytest.FixtureRequest) -> Iterator[Roles]:
    r = Roles(redis_url, prefix, tmp_path, shards)
    yield r
    r.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(r.logs())

@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Keep each phase's report on the item so fixtures can print role logs on failure.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def servers() -> Iterator[list[EmbeddedRedis]]:
    """Redis servers a test started; stopped (directories kept for tmp_path) at teardown."""
    started: list[EmbeddedRedis] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def make_roles(servers: list[EmbeddedRedis], prefix: str, tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[Callable[[str], Roles]]:
    """Roles against a test's own server; stopped before the servers are (fixture order)."""
    made: list[Roles] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def make(url: str) -> Roles:
        made.append(Roles(url, prefix, logs))
        return made[-1]

    yield make
    for roles in made:
        roles.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for roles in made:
            print(roles.logs())


class TlsCerts(msgspec.Struct, frozen=True):
    """A private CA, and the certificates and keys it signed (P-256 keys: quick to make)."""

    ca: Path
    """The CA that signed the server's certificate (for 127.0.0.1) and the client's."""
    cert: Path
    key: Path
    """The client's certificate and key, for mutual TLS."""
    other_ca: Path
    """A CA that signed neither the server's certificate nor the client's."""
    rogue_cert: Path
    """A certificate for the client's key signed by ``other_ca``: one a mutual-TLS server refuses."""


class TlsRedis(msgspec.Struct, frozen=True):
    """A redis-server that speaks only TLS, and the CA that signed its certificate."""

    port: int
    ca: Path
    certs: TlsCerts

    @property
    def url(self) -> str:
        """A ``rediss://`` URL that trusts the server (its CA given, as a user would)."""
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, subject: str, ca: str, cwd: Path, *extra: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", subject,
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=cwd)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", *extra, "-out", f"{name}.pem", cwd=cwd)


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCerts:
    """Certificates made with openssl for the session (skipped where there is none)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make certificates")
    certs = tmp_path_factory.mktemp("tls")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                 "-subj", f"/CN=test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=certs)
    (certs / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _signed("server", "/CN=127.0.0.1", "ca", certs, "-extfile", "san.ext")
    _signed("client", "/CN=test client", "ca", certs)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "other-ca.pem", "-CAkey", "other-ca.key", "-CAcreateserial",
             "-days", "2", "-out", "rogue.pem", cwd=certs)
    return TlsCerts(ca=certs / "ca.pem", cert=certs / "client.pem", key=certs / "client.key",
                    other_ca=certs / "other-ca.pem", rogue_cert=certs / "rogue.pem")


def _tls_server(certs: TlsCerts, *, auth_clients: bool, cluster: bool = False) -> Iterator[TlsRedis]:
    port = free_port()
    # --port 0: no plaintext listener; the TLS port is the only way in.
    server = EmbeddedRedis(port=port, extra_args=(
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs.ca.parent / "server.pem"),
        "--tls-key-file", str(certs.ca.parent / "server.key"), "--tls-ca-cert-file", str(certs.ca),
        "--tls-auth-clients", "yes" if auth_clients else "no",
        # The bus port: its default, port + 10000, may not exist.
        *(("--cluster-enabled", "yes", "--tls-cluster", "yes", "--cluster-port", str(free_port())) if cluster else ())))
    try:
        server.start()
    except EmbeddedRedisError as exc:
        pytest.skip(f"redis-server without TLS: {exc}")
    try:
        if cluster:
            _own_every_slot(port, certs)
        yield TlsRedis(port=port, ca=certs.ca, certs=certs)
    finally:
        server.stop()


def _own_every_slot(port: int, certs: TlsCerts) -> None:
    """Make a lone cluster-mode node a whole cluster: every slot its own, state ok."""
    import redis

    node = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(certs.ca), ssl_certfile=str(certs.cert),
                       ssl_keyfile=str(certs.key), socket_timeout=5)
    try:
        node.cluster("ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while node.cluster("INFO")["cluster_state"] != "ok":  # type: ignore[index]
            assert time.monotonic() < deadline, "a one-node cluster did not reach cluster_state:ok in 10 s"
            time.sleep(0.02)
    finally:
        node.close()


@pytest.fixture(scope="session")
def tls_redis(tls_certs: TlsCerts) -> Iterator[TlsRedis]:
    """A TLS-only redis-server on a free port, with a private CA and a certificate for 127.0.0.1;
    clients need no certificate of their own.

    Skipped where there is no ``openssl`` or the redis-server was built without TLS.
    """
    yield from _tls_server(tls_certs, auth_clients=False)


@pytest.fixture(scope="session")
def mtls_redis(tls_certs: TlsCerts) -> Iterator[TlsRedis]:
    """Like ``tls_redis``, with mutual TLS: a client must show a certificate signed by the CA
    (``tls_certs.cert`` and ``.key``)."""
    yield from _tls_server(tls_certs, auth_clients=True)


@pytest.fixture(scope="session")
def mtls_cluster(tls_certs: TlsCerts) -> Iterator[TlsRedis]:
    """A one-node Redis Cluster (every slot on one node) with mutual TLS, its bus over TLS too:
    for ``rediss+cluster://`` URLs."""
    yield from _tls_server(tls_certs, auth_clients=True, cluster=True)
