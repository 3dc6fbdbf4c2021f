"""A whole local stack in processes: embedded Redis (or a local cluster), a policy worker and the pools.

Used by ``inference-broker up`` and ``demo``. Each role is a separate OS process
(``python -m cli policy`` / ``worker``), exactly what compose runs, so the local stack
exercises the same code paths as a deployment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.cluster import RedisCluster

from broker.connection import CLUSTER_SCHEMES, is_cluster
from broker.errors import BrokerError
from broker.heartbeats import decoder_of, fresh, read_beats
from broker.process import die_with_parent
from broker.settings import Settings
from broker.topology import Topology
from cli.cluster import EmbeddedCluster
from cli.embedded import EmbeddedRedis


class Gateway:
    """The stack's OpenAI-compatible gateway: on ``port`` of 127.0.0.1, with the API keys of the
    environment (``IB_GATEWAY_KEYS_FILE``, ``IB_GATEWAY_KEYS``) when ``keyed``, else without keys."""

    def __init__(self, port: int, keyed: bool) -> None:
        self.port = port
        self.keyed = keyed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float, check: Callable[[], None]) -> None:
        """Block until its /readyz answers 200 (``check`` runs on every poll and may raise)."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            check()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise BrokerError(f"the gateway on port {self.port} was not ready within {timeout:g} s")
            time.sleep(0.1)


class Stack:
    """Starts the roles (and an embedded Redis when ``settings.redis_url`` is None).

    ``cluster`` (primaries, replicas per primary): instead of the embedded Redis, a local
    Redis Cluster of that many redis-server processes (:class:`~cli.cluster.EmbeddedCluster`).
    """

    def __init__(self, settings: Settings, *, workers: dict[str, int], log: IO[bytes] | None = None,
                 extra_env: dict[str, str] | None = None, cluster: tuple[int, int] | None = None,
                 gateway: Gateway | None = None) -> None:
        if cluster is not None and settings.redis_url:
            raise ValueError("a local cluster is started only when no Redis URL is given")
        self.settings = settings
        self.cluster_size = cluster
        self.cluster: EmbeddedCluster | None = None
        self.workers = workers
        """Pool name to number of worker processes."""
        self.log = log
        self.extra_env = extra_env or {}
        self.embedded: EmbeddedRedis | None = None
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.url = settings.redis_url or ""
        self.metrics_ports: dict[str, int] = {}
        """Role label to the port of its HTTP endpoint (/metrics, /healthz, /readyz), when served."""
        self.gateway = gateway

    def _spawn(self, label: str, *args: str, metrics: bool = True) -> None:
        cmd = [sys.executable, "-m", "cli", *args, "--prefix", self.settings.prefix,
               "--shards", str(self.settings.shards), "--log-format", self.settings.log_format]
        if self.settings.config:
            cmd += ["--config", str(self.settings.config)]
        # The URL goes in the environment, not the command line: a password in it would
        # show in every `ps` listing.
        env = {**os.environ, **self.extra_env, "REDIS_URL": self.url}
        env.pop("IB_METRICS_PORT", None)  # each role gets its own port below, or none
        if self.settings.metrics_port is not None and metrics:
            base = self.settings.metrics_port
            port = base + len(self.processes) if base else 0  # 0: each role picks a free port
            cmd += ["--metrics-port", str(port)]
            self.metrics_ports[label] = port
        # A role outlives nothing: if this process is killed outright, its roles get SIGTERM
        # (and drain) rather than run on orphaned.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env,
                                preexec_fn=die_with_parent)
        self.processes.append((label, proc))

    def start(self) -> Stack:
        """Start Redis if needed, then the policy worker and every pool's workers.

        With ``settings.metrics_port`` N the roles serve their endpoints on consecutive
        ports: the policy worker on N, the workers on N+1, N+2, ... (:attr:`metrics_ports`).
        """
        if self.cluster_size is not None:
            if self.cluster is None:
                self.cluster = EmbeddedCluster(*self.cluster_size, owned=True).start()
                self.url = self.cluster.url
        elif self.embedded is None and not self.settings.redis_url:
            self.embedded = EmbeddedRedis(owned=True).start()
            self.url = self.embedded.url
        self._spawn("policy", "policy")
        for pool, count in self.workers.items():
            for i in range(count):
                self._spawn(f"worker-{pool}-{i}", "worker", "--pool", pool)
        if self.gateway is not None:  # it serves /metrics on its own port
            self._spawn("gateway", "gateway", "--port", str(self.gateway.port),
                        *([] if self.gateway.keyed else ["--no-auth"]), metrics=False)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until every role has sent a heartbeat and the gateway (if any) is ready (raises if
        one exits or time runs out)."""
        wait_for_roles(self.url, self.settings.topology, self.workers, timeout=timeout, check=self.check_alive)
        if self.gateway is not None:
            self.gateway.wait_ready(timeout, self.check_alive)

    def check_alive(self) -> None:
        """Raise if a role process has exited."""
        for label, proc in self.processes:
            if proc.poll() is not None:
                raise BrokerError(f"{label} exited with status {proc.returncode}")

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM every role, wait for them to drain (the workers' grace + 5 s), then stop Redis
        (every node of a local cluster)."""
        grace = self.settings.grace_s + 5 if grace is None else grace
        for _label, proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for _label, proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def wait_for_roles(url: str, topo: Topology, workers: dict[str, int], *, timeout: float = 30.0,
                   max_age: float = 5.0, check: Callable[[], None] | None = None) -> None:
    """Block until a policy worker and ``workers[pool]`` workers of each pool send fresh heartbeats.

    Only heartbeats younger than ``max_age`` count: a killed role leaves its entry behind.
    ``check`` runs on every poll and may raise (e.g. when a role process exited).
    """
    client = sync_client(url)
    deadline = time.monotonic() + timeout
    keys = [topo.policy_heartbeats, *(topo.heartbeats(pool) for pool in workers)]
    wanted = [1, *workers.values()]
    try:
        while True:
            if check is not None:
                check()
            now = time.time()
            pipe = client.pipeline()
            for key in keys:
                pipe.hgetall(key)
            live = [fresh(read_beats(fields, decoder_of(topo, key), key), now, max_age)
                    for key, fields in zip(keys, pipe.execute(), strict=True)]
            if all(have >= want for have, want in zip(live, wanted, strict=True)):
                return
            if time.monotonic() > deadline:
                missing = [k.rsplit(":", 1)[-1] for k, have, want in zip(keys, live, wanted, strict=True)
                           if have < want]
                raise BrokerError(f"roles not ready after {timeout:.0f} s: no fresh heartbeat from "
                                  f"{', '.join(missing)}. Are the policy worker and the pools running?")
            time.sleep(0.05)
    finally:
        client.close()


def sync_client(url: str) -> redis.Redis:
    """A blocking client for ``url``: a node's, or a cluster's for a cluster URL (typed as a node's,
    as :func:`broker.connection.connect` does; only single-slot commands are sent through it)."""
    if is_cluster(url):
        parts = urlsplit(url)
        node_url = urlunsplit(parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme]))
        return cast(redis.Redis, RedisCluster.from_url(node_url))
    return redis.Redis.from_url(url)


def state_file() -> Path:
    """Where ``up`` records its Redis (:func:`write_state`) so other commands find it by default."""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(Path.home(), ".cache")
    return Path(base) / "inference-broker" / "up.url"


def write_state(url: str, shards: int) -> None:
    """Record the URL of ``up``'s Redis on the state file's first line, its shard count on the second."""
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{url}\nshards={shards}\n")


def read_state() -> tuple[str, int | None]:
    """The URL and shard count ``up`` recorded (None: not recorded). Raises OSError if none is."""
    lines = state_file().read_text().splitlines()
    url = lines[0].strip() if lines else ""
    shards = next((int(value) for line in lines[1:] if (value := line.partition("shards=")[2]).isdigit()),
                  None)
    return url, shards
