"""Every Redis key the broker uses, from one place, under a configurable prefix.

All keys of one deployment share the hash tag ``{<prefix>}`` so that the scripts which
change several of them at once (route: ingress + pool + dedup key; complete: pool +
result key + reply stream) stay in one slot and run unchanged on Redis Cluster. To spread
load across a cluster, run several deployments under different prefixes.
"""

from __future__ import annotations

import re

import msgspec

POLICY_GROUP = "policy"
"""Consumer group of policy workers on the ingress stream."""
WORKER_GROUP = "workers"
"""Consumer group of a pool's workers on its pool stream."""
RESERVED = frozenset({"jobs", "dead", "pool", "done", "routed", "hb", "err", "replies", "epoch", "tokens"})
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,32}")


class Topology(msgspec.Struct, frozen=True):
    """Key names for one deployment."""

    prefix: str = "ib"

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must be 1-32 characters of A-Z a-z 0-9 _ . -")

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.prefix}}}"

    @property
    def jobs(self) -> str:
        """Ingress stream: producers XADD jobs here."""
        return f"{self.base}:jobs"

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
        """A result stream, by the name a job gives in ``reply_to`` (default ``results``)."""
        if name in RESERVED:
            raise ValueError(f"reply stream name {name!r} is reserved")
        return f"{self.base}:{name}"

    def routed(self, job_id: str) -> str:
        """Marker that a job was routed (makes routing idempotent)."""
        return f"{self.base}:routed:{job_id}"

    def done(self, job_id: str) -> str:
        """A job's result, kept for ``result_ttl``: one outcome per job, and a fast lookup."""
        return f"{self.base}:done:{job_id}"

    def tokens(self, job_id: str) -> str:
        """A streamed job's output as it is generated (``Job.stream``); bounded, expires."""
        return f"{self.base}:tokens:{job_id}"

    def errors(self, pool: str, lane: int = 0) -> str:
        """Key prefix for the last error of each retried entry of a pool's lane (+ entry id)."""
        return f"{self.base}:err:{pool}:" + (f"{lane}:" if lane else "")

    @property
    def replies(self) -> str:
        """Set of the reply stream names results were written to (for retention)."""
        return f"{self.base}:replies"

    @property
    def epoch(self) -> str:
        """Marker written at start; its absence later means Redis lost its data."""
        return f"{self.base}:epoch"

    def heartbeats(self, pool: str) -> str:
        """Hash of worker name to its latest heartbeat, for pool ``pool``."""
        return f"{self.base}:hb:pool:{pool}"

    @property
    def policy_heartbeats(self) -> str:
        """Hash of policy worker name to its latest heartbeat."""
        return f"{self.base}:hb:policy"
