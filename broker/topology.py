"""Every Redis key the broker uses, from one place, under a configurable prefix.

A deployment has ``shards`` shards (``Settings.shards``). Every key of one shard shares
that shard's hash tag, so the scripts which change several keys at once (route: ingress +
pool + dedup key; complete: pool + result key + reply stream) stay in one slot and run
unchanged on Redis Cluster, while the shards spread over its nodes. With one shard the tag
is ``{<prefix>}`` (the key names of a deployment before shards existed); with S shards,
shard i's tag is ``{<prefix>.<i>}``.

A job lives on one shard from submission to result: :func:`shard_of` its id, the Redis
Cluster slot of the id (CRC16 mod 16384, ``CLUSTER KEYSLOT``) mod S. So every producer,
in any language, finds the same shard, and dedup by id holds across shards. Deployment-wide
state that no job touches (the roles' heartbeats) lives on shard 0.

A job also lives in one *space*: the deployment's default space, or its tenant's
(``Topology.tenant``, docs/security.md). A tenant's keys sit under ``<base>:~<tenant>:`` on
each shard: its ingress, done keys, token streams, routed markers and reply streams (under
``r:``). ``~`` is in no job id, stream name or tenant name, so no key of one space is a key of
another, and a Redis ACL key pattern ``<base>:~<tenant>:*`` holds exactly one tenant's keys.
Pool lanes, dead letters and the roles' state stay the shard's, outside every space.
"""

from __future__ import annotations

import re

import msgspec
from redis.crc import key_slot

POLICY_GROUP = "policy"
"""Consumer group of policy workers on the ingress stream."""
WORKER_GROUP = "workers"
"""Consumer group of a pool's workers on its pool stream."""
RESERVED = frozenset({"jobs", "dead", "pool", "done", "routed", "hb", "err", "replies", "epoch", "tokens"})
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,32}")
TENANT_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
"""A tenant with a key space of its own: no ``.`` (ACL patterns stay plain), never ``default``."""
DEFAULT_TENANT = "default"
"""The tenant of the default space (``Topology.tenant == ""``), as results name it."""


MAX_SHARDS = 1024
"""Most shards a deployment may have (a role reads each shard's streams)."""


def shard_of(job_id: str, shards: int) -> int:
    """The shard of job ``job_id`` among ``shards``: its Redis Cluster slot mod ``shards``.

    Job ids hold no braces (:data:`broker.wire.JobId`), so the slot is CRC16 of the whole id
    mod 16384, what ``redis-cli CLUSTER KEYSLOT <id>`` prints (docs/wire-format.md).
    """
    return key_slot(job_id.encode()) % shards if shards > 1 else 0


def check_tenant(name: str) -> str:
    """``name`` if it can name a tenant's space, else ``ValueError`` saying what can."""
    if not TENANT_NAME.fullmatch(name) or name == DEFAULT_TENANT:
        raise ValueError(f"tenant {name!r} must be 1-32 characters of A-Z a-z 0-9 _ - (and not {DEFAULT_TENANT!r})")
    return name


class Topology(msgspec.Struct, frozen=True):
    """Key names for one shard (``shard``) of a deployment of ``shards`` shards, in the space of
    ``tenant`` (``""``: the default space)."""

    prefix: str = "ib"
    shards: int = 1
    shard: int = 0
    tenant: str = ""

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must be 1-32 characters of A-Z a-z 0-9 _ . -")
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"shards {self.shards} must be 1-{MAX_SHARDS}")
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} must be 0-{self.shards - 1}")
        if self.tenant:
            check_tenant(self.tenant)

    @property
    def tag(self) -> str:
        """The hash tag every key of this shard shares (without braces)."""
        return self.prefix if self.shards == 1 else f"{self.prefix}.{self.shard}"

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.tag}}}"

    @property
    def space(self) -> str:
        """Base of this space's keys: the shard's base, or its tenant's under it."""
        return f"{self.base}:{self.rel}".removesuffix(":")

    @property
    def rel(self) -> str:
        """This space's keys' path under the shard's base: ``""`` or ``~<tenant>:``."""
        return f"~{self.tenant}:" if self.tenant else ""

    def at(self, shard: int) -> Topology:
        """The keys of shard ``shard`` of this deployment (in this space)."""
        return self if shard == self.shard else Topology(self.prefix, self.shards, shard, self.tenant)

    def of_tenant(self, tenant: str) -> Topology:
        """This shard's keys in ``tenant``'s space (``""`` or ``default``: the default space)."""
        tenant = "" if tenant == DEFAULT_TENANT else tenant
        return self if tenant == self.tenant else Topology(self.prefix, self.shards, self.shard, tenant)

    @property
    def every_shard(self) -> list[Topology]:
        """Each shard's keys, shard 0 first."""
        return [self.at(i) for i in range(self.shards)]

    def of_job(self, job_id: str) -> Topology:
        """The keys of the shard job ``job_id`` lives on (:func:`shard_of`)."""
        return self.at(shard_of(job_id, self.shards))

    @property
    def home(self) -> str:
        """Base of the deployment-wide keys (heartbeats): shard 0's."""
        return self.at(0).base

    @property
    def jobs(self) -> str:
        """Ingress stream of this space: its producers XADD jobs here."""
        return f"{self.space}:jobs"

    @property
    def dead(self) -> str:
        """Dead-letter stream."""
        return f"{self.base}:dead"

    def pool(self, name: str, lane: int = 0) -> str:
        """Stream of jobs routed to pool ``name`` in priority lane ``lane``.

        A pool has one stream per class priority; its workers read lane 0 (the most urgent)
        first, after each lower lane's reserved slots (``min_share``). Lane 0 has no suffix,
        so a config with a single priority has one plain stream.
        """
        return f"{self.base}:pool:{name}" + (f":{lane}" if lane else "")

    def reply(self, name: str) -> str:
        """A result stream of this space, by the name a job gives in ``reply_to`` (default ``results``)."""
        return self.under(self.reply_path(name))

    def reply_path(self, name: str) -> str:
        """Where :meth:`reply` is under the shard's base: ``name``, or ``~<tenant>:r:<name>``
        (the path the ``replies`` set records and the scripts take)."""
        if name in RESERVED:  # in every space, so that a job's reply_to means the same anywhere
            raise ValueError(f"reply stream name {name!r} is reserved")
        return f"{self.rel}r:{name}" if self.tenant else name

    def under(self, path: str) -> str:
        """The key at ``path`` under the shard's base (a path from :meth:`reply_path`)."""
        return f"{self.base}:{path}"

    def routed(self, job_id: str) -> str:
        """Marker that a job was routed (makes routing idempotent)."""
        return f"{self.space}:routed:{job_id}"

    def done(self, job_id: str) -> str:
        """A job's result, kept for ``result_ttl``: one outcome per job, and a fast lookup."""
        return f"{self.space}:done:{job_id}"

    def tokens(self, job_id: str) -> str:
        """A streamed job's output as it is generated (``Job.stream``); bounded, expires."""
        return f"{self.space}:tokens:{job_id}"

    def errors(self, pool: str, lane: int = 0) -> str:
        """Key prefix for the last error of each retried entry of a pool's lane (+ entry id)."""
        return f"{self.base}:err:{pool}:" + (f"{lane}:" if lane else "")

    @property
    def replies(self) -> str:
        """Set of the reply stream paths (:meth:`reply_path`) results were written to, every
        space's (for retention)."""
        return f"{self.base}:replies"

    @property
    def epoch(self) -> str:
        """Marker written at start; its absence later means Redis lost its data."""
        return f"{self.base}:epoch"

    def heartbeats(self, pool: str) -> str:
        """Hash of worker name to its latest heartbeat, for pool ``pool`` (on shard 0)."""
        return f"{self.home}:hb:pool:{pool}"

    @property
    def policy_heartbeats(self) -> str:
        """Hash of policy worker name to its latest heartbeat (on shard 0)."""
        return f"{self.home}:hb:policy"
