"""Exceptions raised to users of the SDK and CLI.

::

    BrokerError
    ├── RedisUnavailable     Redis cannot be reached (the message says where and what to do)
    │   └── RedisMisconfigured   it never will be as configured (TLS on one side only, an untrusted certificate)
    ├── ScriptsNotLoaded     Redis lost the broker's scripts and this user may not load them (retry soon)
    ├── EmbeddedRedisError   the embedded redis-server could not start
    ├── JobRejected          a job was refused before it reached the stream (bad or too large)
    │   └── Backpressure     the ingress backlog is full; ``.accepted`` lists what went in
    │       └── RedisOutOfMemory  Redis is at ``maxmemory`` and refuses writes (retry later)
    ├── NotReplicated        jobs were submitted, but too few replicas confirmed them in time
    ├── ResultTimeout        no result arrived in time (the job may still finish later)
    └── JobFailed            the job ended without output; ``.result`` holds its status and error

``policies.config.ConfigError`` (a ``ValueError``) reports an invalid policy file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis.exceptions

if TYPE_CHECKING:
    from broker.wire import Result


class BrokerError(Exception):
    """Base class of the broker's own errors."""


class RedisUnavailable(BrokerError):
    """Redis could not be reached."""


class RedisMisconfigured(RedisUnavailable, redis.exceptions.ConnectionError):
    """The URL cannot work against the server there (TLS mismatch, untrusted certificate): retrying will not help.

    A ``redis.exceptions.ConnectionError`` too, so that code which rides out a lost connection
    handles it alike; :func:`broker.connection.connect` clients do not retry it. Callers may get
    it as the cause of another ``ConnectionError``: :func:`broker.connection.misconfigured` finds it.
    """


class ScriptsNotLoaded(BrokerError):
    """Redis does not know the broker's scripts (it restarted empty, or failed over) and this
    client's ACL user may not load them: a tenant's producer runs none of its own Lua
    (docs/security.md). The roles load them again when they next start or sweep."""


class EmbeddedRedisError(BrokerError):
    """The embedded redis-server could not be started."""


class JobRejected(BrokerError):
    """The job was refused before submission."""


class Backpressure(JobRejected):
    """An ingress backlog is at its bound; retry later. ``accepted``: the ids that went in, in
    submission order (with one shard, those submitted before it filled)."""

    def __init__(self, message: str, *, accepted: list[str]) -> None:
        super().__init__(message)
        self.accepted = list(accepted)


class RedisOutOfMemory(Backpressure):
    """Redis is at ``maxmemory`` (with ``noeviction``) and refused the jobs; retry later.
    ``accepted``: ids submitted before it filled."""


class NotReplicated(BrokerError):
    """Jobs reached their primary, but fewer replicas than ``submit_replicas`` confirmed them in
    time: a failover now could lose them. ``accepted``: every id submitted (these included);
    ``unconfirmed``: those not confirmed. Submitting the same ids again is safe: a job id is
    routed once."""

    def __init__(self, message: str, *, accepted: list[str], unconfirmed: list[str]) -> None:
        super().__init__(message)
        self.accepted = list(accepted)
        self.unconfirmed = list(unconfirmed)


class ResultTimeout(BrokerError, TimeoutError):
    """No result arrived within the timeout."""


class JobFailed(BrokerError):
    """The job ended with a status other than ``ok``."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"job {result.id} {result.status}: {result.error or 'no detail'}")
        self.result = result
        self.retry_after_s = result.retry_after_s
        """Set when admission refused the job (``rejected``): when sending it again may succeed."""
