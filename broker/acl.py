"""Least-privilege Redis ACL users, one per role of a deployment (``inference-broker acl``).

Redis checks an ACL user's commands and key patterns on every command, those a Lua script
runs included, but never a command's other arguments. So isolation comes from key names
(docs/configuration.md, "ACL roles"): a tenant's keys all start ``<p>:{<tag>}:~<tenant>:``,
and its producer may touch nothing else. Each user starts from ``resetkeys resetchannels
-@all`` and gets back exactly the commands its role sends (found by running each role under
a restricted user and reading ``ACL LOG``, tests/test_acl.py) and its key patterns, split
into ``%R~`` (read), ``%W~`` (write) and ``~`` (both).

Two Redis rules shape the patterns:

- A key passed to ``EVALSHA`` as one of ``KEYS`` needs read *and* write permission, whatever
  the script does with it (EVAL's key spec). Every key our scripts take in ``KEYS`` is
  therefore ``~``: a producer's own ingress (SUBMIT reads its length), a pool worker's
  dead-letter stream (DEAD).
- A command inside a script is checked like any other: a script cannot do more than its
  caller's user may, so ``EVAL`` grants no command or key beyond the user's own.

Passwords never appear in argv or logs: rules carry ``#<sha256>`` of a random password.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import msgspec

from broker.topology import Topology

CONNECT = ("ping", "select")
"""What every role sends on connecting: PING (readiness), SELECT (a URL naming a database)."""
CLUSTER = ("cluster|slots", "command", "asking")
"""What redis-py's cluster client adds: the slot map and command table it starts from, and
ASKING while a slot migrates."""
SCRIPTING = ("evalsha", "eval", "script|load")
"""Running the broker's scripts: by SHA, by source when a restarted Redis forgot them, and
teaching them back (:class:`broker.scripts.Scripts`)."""
RUN_SCRIPTS = ("evalsha",)
"""A producer runs the broker's scripts by SHA only: with ``EVAL`` or ``SCRIPT LOAD`` it could
run Lua of its own, and a loop would block Redis for every tenant. The roles load the
scripts as they start (``Scripts.teach``); a producer that finds them gone gets
``ScriptsNotLoaded`` until a role loads them again."""
SUBMIT = ("xlen", "xadd")
"""What SUBMIT runs inside Redis (the backlog check, the add)."""
RESULTS = ("get", "exists", "time", "xread", "wait")
"""Waiting for results: done keys, reply and token streams, the server's clock, WAIT for
``submit_replicas``."""
GROUP_READ = ("xgroup|create", "xreadgroup", "xack", "xautoclaim", "xpending", "xclaim")
"""Following a reply stream through a consumer group (``Client.results``, ``results --group``,
FastStream's ``ResultSubscriber`` and its claims): granted on reply streams only, by a
selector, so that no group on an ingress or a pool lane can be read, claimed or acked."""
CANCEL = ("get", "set", "type", "exists", "xpending", "xdel", "xadd", "sadd")
"""CANCEL, inside Redis."""
CONSUME = ("xgroup|create", "xreadgroup", "xack", "xautoclaim", "xclaim", "xpending", "xdel", "xtrim", "xadd",
           "xinfo|groups", "type", "hmget", "set", "sadd", "hset", "hdel")
"""Consuming a stream through a group: reads, reclaim (CLAIM), RENEW, COMPLETE and DEAD
(fenced, acked, deleted once handled), results and their markers, heartbeats."""
WORKER = ("del", "pexpire", "hgetall")
"""NACK's retry-error hashes, token streams' expiry, ``health --pool`` reading the pool's beats."""
DELETE = ("del", "xdel", "xtrim")
"""What a pool worker may send only on its lanes and retry errors (selectors)."""
POLICY = ("get", "del", "exists", "srem", "smembers", "hgetall", "xlen", "xinfo|consumers", "xinfo|stream",
          "xgroup|delconsumer", "xgroup|destroy", "xrevrange", "info")
"""The policy worker's janitor (epoch marker, reply-stream retention and reaping, dead-letter
trimming, stale heartbeats and consumers, abandoned groups), pool backlogs for routing and
INFO's ``maxmemory_policy`` (CONFIG GET would show every setting, passwords included)."""
LEDGER = ("hset", "hsetnx", "hgetall", "expire", "zadd", "zrem", "zremrangebyscore", "zrevrank", "zrevrange",
          "sadd", "srem", "scard", "smembers", "get", "set", "del")
"""The gateway's Batch API records and its batch-runner lease."""
OPERATOR = ("xrange", "xdel", "del", "xadd", "type", "xpending")
"""Dead letters (list, replay: REPLAY, purge), ``cancel``'s lookups, ``results``."""
READ_STREAMS = ("xlen", "xinfo|groups", "xpending", "hgetall", "scan")
"""Looking without touching: stream sizes and groups, heartbeats; SCAN lists the pool streams
for ``top`` (SCAN is not limited by key patterns: it shows every key *name*)."""
READ_RESULTS = ("xrange", "xrevrange")
"""Reading results (``top``'s throughput and latency, ``report``): on reply streams only."""

_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


class Role(NamedTuple):
    """One ACL user: its name, what it is for, its commands and its key patterns.

    ``selectors``: further (commands, keys) pairs, each granting its commands on its keys
    only (Redis 7 ACL selectors, ``(+cmd ~key)``).
    """

    user: str
    summary: str
    commands: tuple[str, ...]
    keys: tuple[str, ...]
    selectors: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()

    def rule(self, password_hash: str) -> list[str]:
        """The arguments of ``ACL SETUSER`` for this role, with ``#<password_hash>`` (hex SHA-256)."""
        # Redis merges the arguments from "(" to ")" into one selector: these split at spaces.
        selectors = [" ".join([*(f"+{c}" for c in commands), *keys]) for commands, keys in self.selectors]
        return [self.user, "reset", "on", f"#{password_hash}", "resetkeys", "resetchannels", "-@all",
                *(f"+{c}" for c in self.commands), *self.keys, *(f"({s})" for s in selectors)]


class Deployment(msgspec.Struct, frozen=True):
    """What the rules are made from: the deployment's keys, pools and tenants.

    ``cluster``: the roles connect to a Redis Cluster (:data:`CLUSTER` commands). ``replies``: the
    default space's reply streams its producers and roles may use (a tenant may name any
    reply stream: it lives under ``~<tenant>:r:``). ``users``: prefix of the user names.
    """

    prefix: str = "ib"
    shards: int = 1
    pools: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    replies: tuple[str, ...] = ("results", "batches")
    users: str = ""
    cluster: bool = False

    def __post_init__(self) -> None:
        Topology(self.prefix, self.shards)  # the same checks as the roles'
        for tenant in self.tenants:
            if not _NAME.fullmatch(tenant) or tenant == "default":
                raise ValueError(f"tenant {tenant!r} must be 1-32 of A-Za-z0-9_- and not 'default'")
        for pool in self.pools:
            if not _NAME.fullmatch(pool):
                raise ValueError(f"pool {pool!r} must be 1-32 of A-Za-z0-9_-")
        for name in self.replies:
            Topology(self.prefix).reply(name)  # raises for a reserved name

    @property
    def base(self) -> str:
        """Every shard's key base as one ACL pattern (the shard's hash tag, any shard).

        ``{p.*}``: no key of the deployment has a brace after its tag (ids, stream and tenant
        names hold none), so ``*`` there only spans the shard number.
        """
        return f"{self.prefix}:{{{self.prefix if self.shards == 1 else self.prefix + '.*'}}}:"

    @property
    def home(self) -> str:
        """Shard 0's key base: the deployment-wide keys (heartbeats, batch records)."""
        return Topology(self.prefix, self.shards).home + ":"

    @property
    def user_prefix(self) -> str:
        return self.users or f"{self.prefix}-"

    def space(self, tenant: str | None) -> str:
        """The key base of a tenant's space (None: the default space), as a pattern."""
        return self.base + (f"~{tenant}:" if tenant else "")

    def reply_keys(self, tenant: str | None) -> list[str]:
        """A space's reply streams (tenant ``*``: every tenant's)."""
        if tenant:
            return [f"{self.space(tenant)}r:*"]
        return [self.base + name for name in self.replies]

    def pool_keys(self, pool: str) -> list[str]:
        return [f"{self.base}pool:{pool}", f"{self.base}pool:{pool}:*"]


def _every_space(d: Deployment, family: str) -> list[str]:
    """``family`` (``done:*``, ``jobs``...) in the default space and every tenant's."""
    return [d.space(None) + family, d.space("*") + family] if d.tenants else [d.space(None) + family]


def _keys(mode: str, patterns: Iterable[str]) -> list[str]:
    return [f"{mode}~{p}" for p in patterns]


def _replies_everywhere(d: Deployment) -> list[str]:
    return d.reply_keys(None) + (d.reply_keys("*") if d.tenants else [])


def producer(d: Deployment, tenant: str | None) -> Role:
    """A producer of ``tenant`` (None: the default space): its ingress, its results, nothing else."""
    space = d.space(tenant)
    who = f"tenant {tenant}" if tenant else "the default space"
    return Role(
        d.user_prefix + (f"producer-{tenant}" if tenant else "producer"),
        f"producer of {who}: submits to its ingress, reads its own results and token streams",
        _unique(CONNECT, RUN_SCRIPTS, SUBMIT, RESULTS),
        # The ingress is `~`, not `%W~`: SUBMIT takes it in KEYS and reads its length.
        tuple(_keys("", [space + "jobs"]) + _keys("%R", [space + "done:*", space + "tokens:*"])
              + _keys("", d.reply_keys(tenant))),
        ((GROUP_READ, tuple(_keys("", d.reply_keys(tenant)))),))


def gateway(d: Deployment) -> Role:
    """The OpenAI gateway: a producer for every tenant (from the API key), cancels, batches."""
    return Role(
        d.user_prefix + "gateway",
        "gateway: submits and cancels for every tenant, reads their results, runs batches",
        _unique(CONNECT, SCRIPTING, SUBMIT, RESULTS, CANCEL),
        tuple(_keys("", _every_space(d, "jobs") + _every_space(d, "done:*") + _every_space(d, "routed:*"))
              + _keys("%R", _every_space(d, "tokens:*"))
              + _keys("", _replies_everywhere(d) + [d.base + "replies"]
                      + [k for pool in d.pools for k in d.pool_keys(pool)])),
        # The batch records' commands (DEL among them) on the batch records only; EVAL too, for
        # the lease's script (a command's keys must all pass one selector, the root or another).
        ((GROUP_READ, tuple(_keys("", _replies_everywhere(d)))),
         (_unique(LEDGER, ("eval", "evalsha")),
          tuple(_keys("", [d.home + "batch:*", d.home + "batches:*", d.home + "batches-live",
                           d.home + "batches-live:*", d.home + "batches-lease"])))))


def policy(d: Deployment) -> Role:
    """The policy worker (router and janitor): every key of the deployment but token streams."""
    return Role(
        d.user_prefix + "policy",
        "policy worker: routes every ingress to the pools, ends jobs it sheds, janitor",
        _unique(CONNECT, SCRIPTING, CONSUME, POLICY),
        # The whole shard: the janitor reaps and trims every reply stream in `replies`, and a
        # job naming a reply stream is checked (TYPE) before it is routed. A key the router
        # could not touch would fail its whole batch on every redelivery.
        tuple(_keys("", [d.base + "*"])))


def worker(d: Deployment, pool: str) -> Role:
    """A worker of ``pool``: its lanes, the outcomes and token streams of every space."""
    lanes = d.pool_keys(pool)
    errors = [f"{d.base}err:{pool}:*"]
    return Role(
        d.user_prefix + f"worker-{pool}",
        f"pool worker of {pool}: takes jobs from its lanes, writes every tenant's results",
        tuple(c for c in _unique(CONNECT, SCRIPTING, CONSUME, WORKER) if c not in DELETE),
        tuple(_keys("", lanes + errors + [d.base + "dead", d.base + "replies"]
                    + _every_space(d, "done:*") + _replies_everywhere(d))
              + _keys("%W", _every_space(d, "tokens:*"))
              + _keys("", [f"{d.home}hb:pool:{pool}"])),
        # Deleting only where a worker deletes (handled entries of its lanes, its retry
        # errors): never a result, a reply stream or the dead letters.
        ((("xdel", "xtrim"), tuple(_keys("", lanes))), (("del",), tuple(_keys("", errors)))))


def operator(d: Deployment) -> Role:
    """The operator: dead letters (list, replay, purge), cancel, results of every space."""
    return Role(
        d.user_prefix + "operator",
        "operator: dead letters (list, replay, purge), cancel and results of every tenant",
        _unique(CONNECT, SCRIPTING, CANCEL, RESULTS, OPERATOR, READ_STREAMS, READ_RESULTS),
        tuple(_keys("", [d.base + "dead", d.base + "replies"] + _every_space(d, "jobs")
                    + _every_space(d, "done:*") + _every_space(d, "routed:*") + _replies_everywhere(d)
                    + [k for pool in d.pools for k in d.pool_keys(pool)])
              + _keys("%R", _every_space(d, "tokens:*") + [d.home + "hb:*"])),
        ((GROUP_READ, tuple(_keys("", _replies_everywhere(d)))),))


def metrics(d: Deployment) -> Role:
    """The metrics reader (``top``, ``report``): reads backlogs, heartbeats and results; writes nothing."""
    # Stream sizes of every stream, but entries of the reply streams only: a selector, so
    # that no job's payload on the ingress, a pool lane or the dead letters can be read.
    return Role(
        d.user_prefix + "metrics",
        "metrics reader (top, report): reads backlogs, heartbeats, results; writes nothing",
        _unique(CONNECT, READ_STREAMS),
        tuple(_keys("%R", [d.base + "dead"] + _every_space(d, "jobs") + _replies_everywhere(d)
                    + [k for pool in d.pools for k in d.pool_keys(pool)] + [d.home + "hb:*"])),
        ((READ_RESULTS, tuple(_keys("%R", _replies_everywhere(d)))),))


def roles(d: Deployment) -> list[Role]:
    """Every role's user: producers (default space, then each tenant), gateway, policy worker,
    a worker per pool, operator, metrics reader."""
    found = [producer(d, None), *(producer(d, t) for t in d.tenants), gateway(d), policy(d),
             *(worker(d, p) for p in d.pools), operator(d), metrics(d)]
    if d.cluster:
        found = [r._replace(commands=_unique(r.commands, CLUSTER)) for r in found]
    return found


def _unique(*groups: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for group in groups:
        seen.update(dict.fromkeys(group))
    return tuple(seen)


def new_password() -> str:
    """A random password: 256 bits, URL-safe."""
    return secrets.token_urlsafe(32)


def password_hash(password: str) -> str:
    """What ``ACL SETUSER`` takes after ``#``: the hex SHA-256 of the password."""
    return hashlib.sha256(password.encode()).hexdigest()
