"""A private Redis Cluster: N primaries (and optionally replicas) as local redis-server processes.

The nodes are :class:`~cli.embedded.EmbeddedRedis` servers started in cluster mode on free
loopback ports. The cluster is formed the way ``redis-cli --cluster create`` does it, through
plain commands (so no redis-cli is needed): each primary takes an even range of the 16,384
slots, every node meets the first, each replica follows its primary, and the cluster counts
as up when every node reports ``cluster_state:ok`` and knows every other node.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import redis
from redis.crc import key_slot

from broker.errors import EmbeddedRedisError
from broker.topology import Topology
from cli.embedded import EmbeddedRedis, free_port

SLOTS = 16384
BUS_OFFSET = 10000
"""A node talks to its peers on its port + 10,000 (Redis' default cluster bus port)."""


def slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """Even, contiguous, inclusive slot ranges, one per primary (as ``redis-cli --cluster create``)."""
    if primaries < 1:
        raise ValueError("a cluster needs at least one primary")
    bounds = [round(i * SLOTS / primaries) for i in range(primaries + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(primaries)]


def _cmd(client: redis.Redis, *args: object) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def cluster_port() -> int:
    """A free loopback port whose cluster bus port (the port + 10,000) is free and valid too."""
    while True:
        port = free_port()
        if port + BUS_OFFSET > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        return port


class EmbeddedCluster:
    """``primaries`` primaries with ``replicas`` replicas each. A context manager, or ``start()``/``stop()``."""

    def __init__(self, primaries: int = 3, replicas: int = 0, *, node_timeout_ms: int = 2000,
                 owned: bool = False) -> None:
        """``node_timeout_ms``: how long a primary may be unreachable before its replica takes over."""
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one primary and no negative replica count")
        self.primaries = primaries
        self.replicas = replicas
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms))
        ports: list[int] = []
        while len(ports) < primaries * (1 + replicas):
            if (port := cluster_port()) not in ports:
                ports.append(port)
        self.nodes = [EmbeddedRedis(port=port, extra_args=args, owned=owned) for port in ports]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """The cluster URL of the first node: the client learns the others from it."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def placement(self, topo: Topology) -> list[tuple[int, int, int]]:
        """(shard, slot, port of the primary serving it) for each shard of ``topo``'s deployment.

        Asked of the cluster (``CLUSTER SLOTS``), not assumed from how it was formed: a
        failover since then moves slots to the promoted replica.
        """
        client = self._client(self.nodes[0])
        try:
            ranges = _cmd(client, "CLUSTER", "SLOTS")
        finally:
            client.close()
        found = []
        for shard in topo.every_shard:
            slot = key_slot(f"{{{shard.tag}}}".encode())
            port = next(int(r[2][1]) for r in ranges if int(r[0]) <= slot <= int(r[1]))
            found.append((shard.shard, slot, port))
        return found

    def describe(self, topo: Topology) -> list[str]:
        """Where each shard lands, one line per shard, to print at start."""
        replicas = f", {self.replicas} replica(s) each" if self.replicas else ""
        lines = [f"local cluster on 127.0.0.1: {self.primaries} primaries{replicas}",
                 f"  nodes: {', '.join(str(node.port) for node in self.nodes)}"]
        lines += [f"  shard {shard} {{{topo.at(shard).tag}}} -> slot {slot} -> node :{port}"
                  for shard, slot, port in self.placement(topo)]
        return lines

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        """Start every node, form the cluster, and wait until it serves every slot."""
        try:
            for node in self.nodes:
                node.start()
            self._form(time.monotonic() + timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _client(self, node: EmbeddedRedis) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5, decode_responses=True)

    def _form(self, deadline: float) -> None:
        clients = [self._client(node) for node in self.nodes]
        try:
            heads = clients[: self.primaries]
            for client, (first, last) in zip(heads, slot_ranges(self.primaries), strict=True):
                _cmd(client, "CLUSTER", "ADDSLOTS", *range(first, last + 1))
            for node in self.nodes[1:]:
                _cmd(clients[0], "CLUSTER", "MEET", "127.0.0.1", node.port)
            self._wait(deadline, "every node to know every other",
                       lambda: all(len(_cmd(c, "CLUSTER", "NODES").splitlines()) == len(clients)
                                   for c in clients))
            ids = [_cmd(c, "CLUSTER", "MYID") for c in heads]
            for i, client in enumerate(clients[self.primaries:]):
                _cmd(client, "CLUSTER", "REPLICATE", ids[i % self.primaries])
            self._wait(deadline, "cluster_state:ok on every node",
                       lambda: all(_cmd(c, "CLUSTER", "INFO").startswith("cluster_state:ok")
                                   for c in clients))
            # A replica still syncing would make the first WAITs count no replica.
            self._wait(deadline, "every replica to sync with its primary",
                       lambda: all(_cmd(c, "INFO", "replication").get("master_link_status") == "up"
                                   for c in clients[self.primaries:]))
        finally:
            for client in clients:
                client.close()

    def _wait(self, deadline: float, what: str, done: Callable[[], bool]) -> None:
        while not done():
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(f"the local cluster did not form in time: waiting for {what}")
            time.sleep(0.05)

    def primary_nodes(self) -> list[EmbeddedRedis]:
        """The nodes that are primaries now (a replica promoted by a failover included)."""
        found = []
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            client = self._client(node)
            try:
                if _cmd(client, "ROLE")[0] == "master":
                    found.append(node)
            finally:
                client.close()
        return found

    def stop(self) -> None:
        """Stop every node: all are asked at once, then each is waited for (10 s at most, then killed)."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
