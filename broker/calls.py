"""One encoder per Lua script: the only code that lays out a script's KEYS and ARGV.

Each takes typed parameters (a record per repeated entry, such as :class:`Completion`) and
returns a :class:`~broker.scripts.ScriptCall` to run with :class:`~broker.scripts.Scripts` or
:class:`~broker.script_batcher.ScriptBatcher`. The layouts are documented in the head comment
of each script (``broker/lua/<name>.lua``); tests/test_lua.py holds the two together.
Per-job keys (markers, done keys, reply streams) of the batch scripts are built in Lua from
the shard's key base ``<p>:{<tag>}:`` and the job's space under it (``''`` or ``~<tenant>:``,
:attr:`broker.topology.Topology.rel`); they share its hash tag, so the scripts stay in one
slot on Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from broker.scripts import (
    CANCEL,
    CLAIM,
    COMPLETE,
    DEAD,
    DELCONSUMER,
    DROPGROUP,
    EXPIRE_BEATS,
    NACK,
    REAP,
    RENEW,
    REPLAY,
    ROUTE,
    SUBMIT,
    ScriptCall,
)
from broker.topology import WORKER_GROUP, Topology

Codes = list[int | bytes]
"""Per entry of a batch: 1 done, 0 duplicate, -1 fenced, or the type of the key its reply stream
names when that is no stream (:func:`broker.scripts.unanswerable`)."""


class RouteMove(NamedTuple):
    """One job for ROUTE: its ingress entry, the pool lane stream it goes to, its id, the routed
    job and its reply stream path (:meth:`~broker.topology.Topology.reply_path`)."""

    entry_id: bytes
    lane: str
    job_id: str
    routed: bytes
    reply: str


def route(group: str, topo: Topology, ttl_ms: int, moves: Iterable[RouteMove]) -> ScriptCall[Codes]:
    """Move ``moves`` from ``topo``'s ingress (read by ``group``) to their lanes; markers, in
    ``topo``'s space, kept ``ttl_ms``."""
    keys = [topo.jobs]
    lanes: dict[str, int] = {}  # each lane's index in KEYS, counted from 1 as Lua does
    args: list[object] = [group, ttl_ms, topo.base + ":", topo.rel]
    for entry_id, lane, job_id, routed, reply in moves:
        index = lanes.get(lane)
        if index is None:
            keys.append(lane)
            index = lanes[lane] = len(keys)
        args += (entry_id, index, job_id, routed, reply)
    return ScriptCall(ROUTE, keys, args)


class Completion(NamedTuple):
    """One job's outcome for COMPLETE: its entry, key space (:attr:`~broker.topology.Topology.rel`),
    id, reply stream path and encoded result."""

    entry_id: bytes
    space: str
    job_id: str
    reply: str
    result: bytes


@dataclass(frozen=True)
class CompleteTarget:
    """Where COMPLETE acks and publishes: ``stream`` read by ``group``, fenced on ``consumer``
    (``''``: not fenced), results kept ``ttl_ms`` on ``topo``'s shard. ``mark``: the jobs end
    at the policy, which sets their routed markers too (see ROUTE)."""

    stream: str
    group: str
    consumer: str
    topo: Topology
    ttl_ms: int
    mark: bool = False


def complete(target: CompleteTarget, items: Iterable[Completion]) -> ScriptCall[Codes]:
    """Publish each of ``items`` and ack its entry, at ``target``."""
    args: list[object] = [target.group, target.consumer, target.ttl_ms, target.topo.base + ":", int(target.mark)]
    for item in items:
        args += item
    return ScriptCall(COMPLETE, [target.stream, target.topo.replies], args)


class FailedJob(NamedTuple):
    """The failed result that DEAD makes a known job's outcome (unless it has one), kept
    ``ttl_ms``. ``mark``: the job ends at the policy, which sets its routed marker too."""

    job_id: str
    reply: str
    result: bytes
    ttl_ms: int
    mark: bool = False


def dead(stream: str, group: str, entry_id: bytes, consumer: str, letter: bytes, topo: Topology,
         failed: FailedJob | None = None) -> ScriptCall[int]:
    """Dead-letter entry ``entry_id`` of ``stream`` with ``letter``, fenced on ``consumer`` ('' = not)."""
    keys = [stream, topo.dead]
    args: list[object] = [group, entry_id, consumer, letter]
    if failed is not None:  # in the job's space: ``topo``'s
        keys += [topo.done(failed.job_id), topo.reply(failed.reply), topo.replies]
        if failed.mark:
            keys.append(topo.routed(failed.job_id))
        args += [failed.result, failed.ttl_ms, topo.reply_path(failed.reply)]
    return ScriptCall(DEAD, keys, args)


def nack(stream: str, group: str, entry_id: bytes, consumer: str, error_key: str, *, idle_ms: int, error: str,
         ttl_ms: int, delivery: int) -> ScriptCall[int]:
    """Give an entry back, idle ``idle_ms``; a non-empty ``error`` of ``delivery`` is kept
    ``ttl_ms`` at ``error_key``."""
    return ScriptCall(NACK, [stream, error_key], [group, entry_id, consumer, idle_ms, error, ttl_ms, delivery])


def renew(stream: str, group: str, consumer: str, entry_ids: Iterable[bytes]) -> ScriptCall[list[bytes]]:
    """Renew ``consumer``'s leases on ``entry_ids``; replies with those another consumer holds."""
    return ScriptCall(RENEW, [stream], [group, consumer, *entry_ids])


def claim(stream: str, group: str, consumer: str, *, idle_ms: int, cursor: bytes, count: int, suspects: int,
          error_prefix: str, crash_mark: str) -> ScriptCall[list[Any]]:
    """One claim pass from ``cursor`` (see :class:`broker.reclaim.Claimer`, which reads the reply)."""
    return ScriptCall(CLAIM, [stream], [group, consumer, idle_ms, cursor, count, suspects, error_prefix, crash_mark])


def delconsumer(stream: str, group: str | bytes, consumer: str | bytes) -> ScriptCall[int]:
    """Remove ``consumer`` unless it holds entries (-1)."""
    return ScriptCall(DELCONSUMER, [stream], [group, consumer])


def expire_beats(heartbeats: Iterable[str], oldest: float) -> ScriptCall[int]:
    """Delete the beats older than ``oldest`` (epoch seconds) from the ``heartbeats`` hashes."""
    return ScriptCall(EXPIRE_BEATS, list(heartbeats), [oldest])


def dropgroup(stream: str, group: str | bytes, idle_ms: int) -> ScriptCall[int]:
    """Destroy ``group`` if none of its consumers read for ``idle_ms`` (1)."""
    return ScriptCall(DROPGROUP, [stream], [group, idle_ms])


def reap(topo: Topology, path: str, since_ms: int) -> ScriptCall[int]:
    """Delete the reply stream at ``path`` (under ``topo``'s shard) if empty, unread and unwritten
    since ``since_ms``, and forget it (1)."""
    return ScriptCall(REAP, [topo.under(path), topo.replies], [path, since_ms])


def submit(ingress: str, max_backlog: int, jobs: Iterable[bytes]) -> ScriptCall[list[Any]]:
    """Add ``jobs`` while the backlog is under ``max_backlog``; replies [ids added, full backlog or -1]."""
    return ScriptCall(SUBMIT, [ingress], [max_backlog, *jobs])


def replay(topo: Topology, entry_id: str, job_id: str, job: bytes) -> ScriptCall[int]:
    """Put the job of dead letter ``entry_id`` back on the ingress (1), forgetting its outcome."""
    return ScriptCall(REPLAY, [topo.dead, topo.jobs, topo.done(job_id), topo.routed(job_id)], [entry_id, job])


def cancel(topo: Topology, job_id: str, reply: str, result: bytes, ttl_ms: int) -> ScriptCall[int]:
    """End job ``job_id`` with ``result`` (its cancelled result, kept ``ttl_ms``) unless it has an
    outcome or a worker took it (1 when this call ended it)."""
    return ScriptCall(CANCEL, [topo.done(job_id), topo.routed(job_id), topo.reply(reply), topo.replies],
                      [result, ttl_ms, topo.reply_path(reply), topo.base + ":", WORKER_GROUP])
