"""The Lua scripts that move jobs between streams, each in one atomic step.

Every move runs inside a script, so no other client sees a job on two streams, or acked on
one and absent from the next. Each move also writes a per-job marker with ``SET NX``, which
makes it idempotent by job id: a redelivered entry (its consumer died after the move,
before it learned of the ack) is acked again without a second copy downstream. The hot
moves (route, complete, submit) take a whole batch of entries per call; a batch cut short
by an error leaves its unacked entries pending, and their redelivery only acks what had
moved. Handled entries are deleted from their stream once acked, since
only the broker's own group reads the ingress and pool streams: their length is their
backlog, and acked work does not accumulate.

Worker-side scripts are *fenced*: they act only while the caller still owns the entry
(it is pending under the caller's consumer name). ``XACK`` from a consumer that no longer
owns an entry succeeds in Redis, so without the check a worker that was paused past its
lease, and whose job a peer took over, could still ack and publish.

Return codes: 1 done, 0 duplicate (the job already had an outcome; only acked), -1 fenced
(the caller lost the entry; nothing was written).

Redis does not roll back a script that fails part way: what it wrote before the error stays.
So no script writes before it has checked the keys it writes to (see ``_TYPES``), and a job
whose ``reply_to`` names a key that is no stream is left pending for its caller to
dead-letter, with nothing written for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from broker.topology import Topology

log = logging.getLogger("inference_broker.scripts")

# The fence: whether ``consumer`` holds entry ``id`` ('' = not fenced: always).
_OWNS = """
local function owns(stream, group, id, consumer)
  if consumer == '' then return true end
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return p[1] ~= nil and p[1][2] == consumer
end
"""

# Prelude of the single-entry scripts. ARGV[1] group, ARGV[2] entry id, ARGV[3] consumer.
_PRELUDE = _OWNS + """
local function owned(stream) return owns(stream, ARGV[1], ARGV[2], ARGV[3]) end
local function done_with(stream)
  redis.call('XACK', stream, ARGV[1], ARGV[2])
  redis.call('XDEL', stream, ARGV[2])
end
"""

# The entries of ``ids`` that ``consumer`` holds, as a set ('' = not fenced: all of them).
# One XPENDING reads what the consumer holds, up to twice as many entries as ``ids``: all of
# it when its jobs end together (one call instead of one per entry). A consumer holding more
# (long jobs ending one at a time) has the rest of ``ids`` checked one by one.
_HELD = _OWNS + """
local function held(stream, group, ids, consumer)
  local set = {}
  if consumer == '' then
    for _, id in ipairs(ids) do set[id] = true end
    return set
  end
  local cap = 2 * #ids
  local page = redis.call('XPENDING', stream, group, '-', '+', cap, consumer)
  for _, p in ipairs(page) do set[p[1]] = true end
  if #page == cap then
    for _, id in ipairs(ids) do
      if not set[id] and owns(stream, group, id, consumer) then set[id] = true end
    end
  end
  return set
end
"""

# Acks the handled entries ``ids`` of ``stream`` and deletes them. Everything below the
# stream's oldest pending entry has been delivered and acked: XTRIM MINID drops it a stream
# node at a time. With nothing pending, that is everything up to the group's last delivered
# entry (from XINFO GROUPS), which XDEL takes too. Otherwise the handled entries are also
# deleted one by one with XDEL: those the trim already dropped are a quick miss, the others
# (newer than an entry still pending) cost a scan of their node, up to 100 entries. No id
# is parsed here: comparing ids in Lua cost a seventh of Redis' work per job.
# One XACK and one XDEL per 1,000 ids.
_DONE_ALL = """
local function last_delivered(stream, group)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then return info['last-delivered-id'] end
  end
end
local function done_all(stream, group, ids)
  if #ids == 0 then return end
  for i = 1, #ids, 1000 do
    redis.call('XACK', stream, group, unpack(ids, i, math.min(i + 999, #ids)))
  end
  local oldest = redis.call('XPENDING', stream, group)[2]
  if oldest then
    redis.call('XTRIM', stream, 'MINID', oldest)
    for i = 1, #ids, 1000 do
      redis.call('XDEL', stream, unpack(ids, i, math.min(i + 999, #ids)))
    end
  else
    local last = last_delivered(stream, group)
    redis.call('XTRIM', stream, 'MINID', last)
    redis.call('XDEL', stream, last)
  end
end
"""

# Checks for the keys a script writes to, made before its first write. A write in a script
# meets one error that checking can foresee: WRONGTYPE, a key of another type in its place.
# (Redis refuses a script for low memory, a failed disk write or a read-only replica at its
# first write, before anything is written.) `need` raises for a key of the broker's own:
# nothing can be done for the job until an operator fixes it, and the entry stays pending.
# A reply stream is named by the job, so `unanswerable` only reports it (cached per call):
# the job's outcome is then a dead letter. SET never fails (NX on a key of another type is
# a refusal, not an error), so done keys and markers need no check.
_TYPES = """
local function type_of(key) return redis.call('TYPE', key)['ok'] end
local function need(key, kind)
  local t = type_of(key)
  if t ~= kind and t ~= 'none' then
    error({err = 'WRONGTYPE ' .. key .. ' is a ' .. t .. ', not a ' .. kind .. '; nothing was written'})
  end
end
local refused = {}
local function unanswerable(key)
  local t = refused[key]
  if t == nil then
    t = type_of(key)
    if t == 'stream' or t == 'none' then t = false end
    refused[key] = t
  end
  return t
end
"""

# Batch scripts (ROUTE, COMPLETE, SUBMIT) take every entry of a read in one call, so that a
# job costs Redis a few commands rather than a script invocation of its own (a third of
# the broker's Redis CPU went to per-job script calls: bench/PROFILE.md). Each entry is
# still checked and moved on its own, and gets its own code. Per-job keys (markers, done
# keys, reply streams) are built here from the deployment's key base ``<p>:{<p>}:``; they
# share the base's hash tag, so the scripts stay in one slot on Redis Cluster.

# KEYS: ingress, then the pool streams.  ARGV: group, ttl ms, key base, then per entry:
# entry id, the index in KEYS of its pool stream, job id, routed job, reply stream name.
# A job whose reply stream is a key of another type gets that type's name as its code and
# is neither moved nor acked: the policy dead-letters it before it costs a run.
# A job id whose marker is set (routed before, or ended at the policy: COMPLETE and DEAD
# set it there too) is only acked. The marker alone is checked, not the done key as well:
# that was a seventh of Redis' work per job. (A marker expires before its job's done key,
# by the job's time in the system; a duplicate submitted in between runs again, and its
# COMPLETE finds the done key: acked, no second result.)
ROUTE = _TYPES + _DONE_ALL + """
local group, ttl, base = ARGV[1], ARGV[2], ARGV[3]
local codes, ids, pools = {}, {}, {}
need(KEYS[1], 'stream')
for i = 4, #ARGV, 5 do
  local pool = ARGV[i + 1]
  if not pools[pool] then
    pools[pool] = true
    need(KEYS[tonumber(pool)], 'stream')
  end
end
for i = 4, #ARGV, 5 do
  local job = ARGV[i + 2]
  local code = unanswerable(base .. ARGV[i + 4])
  if not code then
    ids[#ids + 1] = ARGV[i]
    code = 0
    if redis.call('SET', base .. 'routed:' .. job, '1', 'NX', 'PX', ttl) then
      redis.call('XADD', KEYS[tonumber(ARGV[i + 1])], '*', 'routed', ARGV[i + 3])
      code = 1
    end
  end
  codes[#codes + 1] = code
end
done_all(KEYS[1], group, ids)
return codes
"""

# KEYS: source stream, reply-stream set.  ARGV: group, consumer ('' = not fenced), ttl ms,
# key base, mark ('1': also set the job's routed marker, for outcomes at the policy), then
# per entry: entry id, job id, reply stream name, result.
# The done key holds the result: the first writer wins and later ones only ack. A fenced
# entry (pending under another consumer, or no longer pending) is left alone. An entry whose
# reply stream is a key of another type gets that type's name as its code, with nothing
# written and the entry left pending: its caller dead-letters it (DEAD). The check comes
# before the done key's: a duplicate is then only acked by DEAD.
COMPLETE = _HELD + _TYPES + _DONE_ALL + """
local group, consumer, ttl, base, mark = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1'
local codes, ids, told, all = {}, {}, {}, {}
for i = 6, #ARGV, 4 do all[#all + 1] = ARGV[i] end
local mine = held(KEYS[1], group, all, consumer)
need(KEYS[1], 'stream')
need(KEYS[2], 'set')
for i = 6, #ARGV, 4 do
  local id, reply, result = ARGV[i], ARGV[i + 2], ARGV[i + 3]
  local code = -1
  if mine[id] then
    code = unanswerable(base .. reply)
    if not code then
      ids[#ids + 1] = id
      code = 0
      if redis.call('SET', base .. 'done:' .. ARGV[i + 1], result, 'NX', 'PX', ttl) then
        if mark then redis.call('SET', base .. 'routed:' .. ARGV[i + 1], '1', 'PX', ttl) end
        redis.call('XADD', base .. reply, '*', 'result', result)
        if not told[reply] then
          told[reply] = true
          redis.call('SADD', KEYS[2], reply)
        end
        code = 1
      end
    end
  end
  codes[#codes + 1] = code
end
done_all(KEYS[1], group, ids)
return codes
"""

# KEYS: source stream, dead stream[, done key, reply stream, reply-stream set[, routed marker]].
# ARGV[4] dead letter[, ARGV[5] failed result, ARGV[6] ttl ms, ARGV[7] reply stream name].
# With a known job its failed result claims the done key first: a job that already has an
# outcome gets no dead letter, only the ack. The policy passes the routed marker too (see ROUTE).
# A reply stream that is a key of another type gets no result (the done key still does): the
# dead letter is the job's outcome.
DEAD = _PRELUDE + _TYPES + """
if not owned(KEYS[1]) then return -1 end
need(KEYS[1], 'stream')
need(KEYS[2], 'stream')
if #KEYS >= 5 then
  need(KEYS[5], 'set')
  if not redis.call('SET', KEYS[3], ARGV[5], 'NX', 'PX', ARGV[6]) then done_with(KEYS[1]) return 0 end
  if KEYS[6] then redis.call('SET', KEYS[6], '1', 'PX', ARGV[6]) end
  if not unanswerable(KEYS[4]) then
    redis.call('XADD', KEYS[4], '*', 'result', ARGV[5])
    redis.call('SADD', KEYS[5], ARGV[7])
  end
end
redis.call('XADD', KEYS[2], '*', 'dead', ARGV[4])
done_with(KEYS[1])
return 1
"""

# KEYS: stream, error key.  ARGV[4] idle ms to set, ARGV[5] error ('' = none), ARGV[6] ttl ms,
# ARGV[7] the delivery that failed. Gives an entry back for a later delivery: marking it
# idle for `idle` ms makes it claimable by any consumer after (claim_idle - idle) ms. JUSTID
# leaves the delivery count alone: it rises when the entry is claimed, i.e. when it is
# really delivered again. The error key (a hash) says which delivery failed and how: a
# delivery with no error there ended with its worker's death, which is no evidence against
# the job (see broker.reclaim).
NACK = _PRELUDE + """
if not owned(KEYS[1]) then return -1 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[4], 'JUSTID')
if ARGV[5] ~= '' then
  redis.call('DEL', KEYS[2])  -- it may be a plain string, as earlier versions wrote it
  redis.call('HSET', KEYS[2], 'error', ARGV[5], 'delivery', ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
return 1
"""

# KEYS: stream.  ARGV: group, consumer, entry ids...  Renews the lease on each entry the
# consumer still owns (idle back to 0, delivery count unchanged); returns the ids another
# consumer holds now. An id pending nowhere was acked: most often the caller's own job,
# completed while this renewal was on its way (not lost); if a peer completed it, the
# caller's own completion is fenced anyway.
RENEW = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] ~= nil then
    if p[1][2] == ARGV[2] then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    else
      table.insert(lost, ARGV[i])
    end
  end
end
return lost
"""

# KEYS: stream.  ARGV: group, consumer, idle ms, cursor, count, suspects wanted, error-key
# prefix ('' = no suspects), crash mark. One claim pass (see broker.reclaim): XAUTOCLAIM
# JUSTID takes ids without counting a delivery. A redelivered id is a suspect when its last
# delivery left no error (its worker died or stalled under it), or an error that starts
# with the crash mark (it killed the sandbox that ran it alone): up to `wanted` are taken to
# run in a sandbox, the rest given straight back (idle, so claimable at once, count
# unchanged). The others are taken with XCLAIM, which counts the delivery and returns their
# fields. (The error keys share the stream's hash tag.)
# Returns {cursor, entries, suspect entries, deleted ids, counts, suspect counts, suspects given back}.
CLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
local wanted = tonumber(ARGV[6])
local given_back = 0
local out = {{}, {}}
local counts = {{}, {}}
local function suspect(id, last)
  local kind = redis.call('TYPE', ARGV[7] .. id).ok
  if kind ~= 'hash' then return kind == 'none' end  -- a string: an error, as earlier versions wrote it
  local err = redis.call('HMGET', ARGV[7] .. id, 'error', 'delivery')
  return not err[1] or err[2] ~= tostring(last) or string.sub(err[1], 1, #ARGV[8]) == ARGV[8]
end
for _, id in ipairs(r[2]) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  local prior = 1
  if p[1] then prior = p[1][4] end
  local kind = 1
  if ARGV[7] ~= '' and prior >= 2 and suspect(id, prior) then
    if wanted > 0 then wanted = wanted - 1; kind = 2 else kind = 0 end
  end
  if kind == 0 then
    given_back = given_back + 1
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID')
  else
    local e = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
    if e[1] then
      table.insert(out[kind], e[1])
      table.insert(counts[kind], prior + 1)
    end
  end
end
return {r[1], out[1], out[2], r[3] or {}, counts[1], counts[2], given_back}
"""

# KEYS: stream.  ARGV: group, consumer.  Removes a consumer only if it holds no pending
# entry *now*: checked and done in one step, so an entry delivered in between is not lost.
DELCONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

# KEYS: heartbeat hashes.  ARGV: oldest beat time kept (epoch seconds). Deletes the fields
# whose beat is older, or not a beat at all, and returns how many. Read and deleted in one
# step: a role that beats again meanwhile keeps its fresh beat.
EXPIRE_BEATS = """
local removed = 0
for _, key in ipairs(KEYS) do
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    local ok, beat = pcall(cjson.decode, flat[i + 1])
    local ts = ok and type(beat) == 'table' and tonumber(beat['ts'])
    if not ts or ts < tonumber(ARGV[1]) then
      redis.call('HDEL', key, flat[i])
      removed = removed + 1
    end
  end
end
return removed
"""

# KEYS: stream.  ARGV: group, idle ms. Destroys the group if none of its consumers has read
# for `idle` ms (or it has none): checked and done in one step, so a consumer that reads
# meanwhile keeps its group. Returns 1 if destroyed.
DROPGROUP = """
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  for i = 1, #c, 2 do
    if c[i] == 'idle' and c[i + 1] < tonumber(ARGV[2]) then return 0 end
  end
end
return redis.call('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
"""

# KEYS: reply stream, reply-stream set.  ARGV: its name, a time (ms). Deletes the reply
# stream if it is empty, no group reads it, and nothing was added to it since that time;
# then forgets its name. In one step with COMPLETE and DEAD, which add a result and the name
# together: a result that arrives meanwhile is kept, and so is the name.
REAP = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('XLEN', KEYS[1]) > 0 or #redis.call('XINFO', 'GROUPS', KEYS[1]) > 0 then return 0 end
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' and tonumber(string.match(info[i + 1], '^%d+')) >= tonumber(ARGV[2]) then
      return 0
    end
  end
  redis.call('DEL', KEYS[1])
end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: ingress.  ARGV: max backlog, then jobs. Adds jobs in order while the backlog is
# under the limit; returns the ids of those added and, if it refused the rest, the backlog
# it found full (else -1). (XLEN fails on an ingress of another type before any write.)
SUBMIT = """
local limit = tonumber(ARGV[1])
local backlog = redis.call('XLEN', KEYS[1])
local ids = {}
for i = 2, #ARGV do
  if backlog >= limit then return {ids, backlog} end
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'job', ARGV[i])
  backlog = backlog + 1
end
return {ids, -1}
"""

# KEYS: dead stream, ingress, done key, routed marker.  ARGV: dead entry id, job.
# Puts a dead job back on the ingress under its id, forgetting its earlier outcome.
REPLAY = _TYPES + """
need(KEYS[2], 'stream')
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('XADD', KEYS[2], '*', 'job', ARGV[2])
return 1
"""


class Scripts:
    """The scripts by SHA. Queue calls on a pipeline, then :meth:`execute` it.

    A Redis that restarted empty has forgotten the scripts; :meth:`execute` then loads them
    and runs again the script calls it refused, and only those: the pipeline's other
    commands (a read) ran once. Every script is idempotent, so a rerun cannot duplicate
    work even if part of the first run went through.
    """

    SOURCES = {"route": ROUTE, "complete": COMPLETE, "dead": DEAD, "nack": NACK, "renew": RENEW,
               "submit": SUBMIT, "replay": REPLAY, "claim": CLAIM, "delconsumer": DELCONSUMER,
               "expire_beats": EXPIRE_BEATS, "dropgroup": DROPGROUP, "reap": REAP}

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.sha = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in self.SOURCES.items()}

    def queue(self, pipe: Pipeline, name: str, keys: list[str], args: list[object]) -> None:
        """Queue script ``name`` on ``pipe``."""
        pipe.evalsha(self.sha[name], len(keys), *keys, *args)  # type: ignore[arg-type]

    async def execute(self, pipe: Pipeline, raise_on_error: bool = True) -> list[object]:
        """Execute ``pipe``, loading the scripts if Redis does not know them; with
        ``raise_on_error``, the first error among the results is raised."""
        stack = list(pipe.command_stack)
        results: list[object] = await pipe.execute(raise_on_error=False)
        unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if unknown:
            await self.load()
            pipe.command_stack = [stack[i] for i in unknown]
            for i, result in zip(unknown, await pipe.execute(raise_on_error=False), strict=True):
                results[i] = result
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results

    async def call(self, name: str, keys: list[str], args: list[object]) -> object:
        """Run one script now."""
        pipe = self.client.pipeline(transaction=False)
        self.queue(pipe, name, keys, args)
        return (await self.execute(pipe))[0]

    async def load(self) -> None:
        for src in self.SOURCES.values():
            await self.client.script_load(src)


def unanswerable(code: object) -> str | None:
    """For a code of ROUTE or COMPLETE: the type of the key the job's ``reply_to`` names, when
    it is no stream (nothing was written for the job and its entry is still pending), else None."""
    return code.decode() if isinstance(code, bytes) else None


def not_a_stream(key: str, kind: str) -> str:
    """The error of the dead letter of a job whose ``reply_to`` names ``key``, a ``kind``."""
    return f"`$.reply_to` names key {key}, which is a {kind}, not a stream: there is nowhere to put its result"


class Completion(NamedTuple):
    """One job's outcome for COMPLETE: its entry, id, reply stream name and encoded result."""

    entry_id: bytes
    job_id: str
    reply: str
    result: bytes


@dataclass(frozen=True)
class CompleteTarget:
    """Where COMPLETE acks and publishes: ``stream`` read by ``group``, fenced on ``consumer``
    (``''``: not fenced), results kept ``ttl_ms`` under ``topo``'s keys. ``mark``: the jobs end
    at the policy, which sets their routed markers too (see ROUTE)."""

    stream: str
    group: str
    consumer: str
    topo: Topology
    ttl_ms: int
    mark: bool = False

    def call(self, items: Iterable[Completion]) -> tuple[list[str], list[object]]:
        """KEYS and ARGV of one COMPLETE for ``items``."""
        args: list[object] = [self.group, self.consumer, self.ttl_ms, self.topo.base + ":", int(self.mark)]
        for item in items:
            args += item
        return [self.stream, self.topo.replies], args


Answer = Callable[[Any], None]
"""Gets a script's result, or its error as an exception object."""


class ScriptBatcher:
    """Runs the script calls made while a batch is in flight together, in one pipeline.

    A worker finishing many jobs at once would otherwise spend a round trip and a pooled
    connection per job. Here the first call starts a flush; calls made meanwhile wait for
    the next one: one connection, one round trip per batch, however many jobs end. The
    completions of a batch go to Redis as one COMPLETE per target stream. Each entry is
    still checked and acted on alone, so batching changes no guarantee. Results (or errors,
    Redis' own as well as a lost connection) go back to each caller.
    """

    def __init__(self, scripts: Scripts) -> None:
        self.scripts = scripts
        self.calls: list[tuple[str, list[str], list[object], Answer]] = []
        self.completions: list[tuple[CompleteTarget, Completion, Answer]] = []
        self.flusher: asyncio.Task[None] | None = None
        self.batches = 0

    async def call(self, name: str, keys: list[str], args: list[object]) -> object:
        """Run script ``name`` with the next batch; its result, or its error raised here."""
        future = asyncio.get_running_loop().create_future()
        self.calls.append((name, keys, args, partial(_settle, future)))
        self._flush_soon()
        return await future

    async def complete(self, target: CompleteTarget, item: Completion) -> int | bytes:
        """Complete one entry with the next batch: 1 done, 0 duplicate, -1 fenced, or the type
        of the key its reply stream is (see COMPLETE and :func:`unanswerable`)."""
        future = asyncio.get_running_loop().create_future()
        self.complete_then(target, item, partial(_settle, future))
        code: int | bytes = await future
        return code

    def complete_then(self, target: CompleteTarget, item: Completion, answer: Answer) -> None:
        """Queue one entry for the next COMPLETE of ``target``; ``answer`` gets its code or error.

        For callers with many entries in flight: no future and no task switch per entry.
        """
        self.completions.append((target, item, answer))
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self.flusher is None:
            self.flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self.calls or self.completions:
                calls, self.calls = self.calls, []
                completions, self.completions = self.completions, []
                groups: dict[CompleteTarget, tuple[list[Completion], list[Answer]]] = {}
                for target, item, answer in completions:
                    items, answers = groups.setdefault(target, ([], []))
                    items.append(item)
                    answers.append(answer)
                try:
                    async with self.scripts.client.pipeline(transaction=False) as pipe:
                        for name, keys, args, _ in calls:
                            self.scripts.queue(pipe, name, keys, args)
                        for target, (items, _) in groups.items():
                            self.scripts.queue(pipe, "complete", *target.call(items))
                        results = await self.scripts.execute(pipe, raise_on_error=False)
                except BaseException as exc:
                    error = exc if isinstance(exc, Exception) else ConnectionError(str(exc))
                    for answer in _answers(calls, completions):
                        _tell(answer, error)
                    if not isinstance(exc, Exception):
                        raise  # cancelled: stop flushing; the callers were told
                    continue
                self.batches += 1
                replies = iter(results)
                for *_, answer in calls:
                    _tell(answer, next(replies))
                for _, answers in groups.values():
                    codes = next(replies)
                    for i, answer in enumerate(answers):
                        _tell(answer, codes if isinstance(codes, Exception) else codes[i])  # type: ignore[index]
        finally:
            self.flusher = None
            # Only if cancelled with calls still waiting.
            for answer in _answers(self.calls, self.completions):
                _tell(answer, ConnectionError("the script batcher stopped"))
            self.calls, self.completions = [], []


def _answers(calls: list[tuple[str, list[str], list[object], Answer]],
             completions: list[tuple[CompleteTarget, Completion, Answer]]) -> list[Answer]:
    return [call[-1] for call in calls] + [completion[-1] for completion in completions]


def _tell(answer: Answer, result: object) -> None:
    """Give ``answer`` its result; a failing answer is logged and does not stop the others."""
    try:
        answer(result)
    except Exception:  # noqa: BLE001 - one caller's bug must not cost the batch its answers
        log.exception("a script result's handler failed")


def _settle(future: asyncio.Future[Any], result: object) -> None:
    if not future.done():
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)
