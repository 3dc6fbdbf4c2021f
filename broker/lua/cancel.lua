-- CANCEL: ends a job that has not started as `cancelled`: its one outcome, written only if it
-- has none yet and no pool worker has taken it.
-- KEYS: done, routed, reply_stream, replies
-- ARGV: result, ttl_ms, reply, base, group
--   done, routed: the job's done key and routed marker; result: its cancelled result; reply: its
--   reply stream name; base: the deployment's key base `<p>:{<p>}:`; group: the pool workers'.
-- Returns 1 cancelled (this call wrote the outcome), 0 not (the job has an outcome, or a worker
-- has taken it: it has started and ends as it would have).
-- requires: types
--
-- A job starts when a pool worker takes its entry from its pool lane: XREADGROUP makes it
-- pending in the workers' group, and from then on the job is the worker's. Before that, the
-- job is on the ingress (no marker: ROUTE will find the one set here and only ack it) or
-- waiting on its lane (the marker names the entry, see ROUTE): the entry is deleted, so no
-- worker ever sees it. A marker that names no entry belongs to a job that ended at the policy
-- (its done key is set) or was routed by an earlier version: not known to be waiting, it is
-- left to run. A reply stream that is a key of another type gets no result (the done key
-- still does), as with DEAD.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
need(KEYS[4], 'set')
local marker = redis.call('GET', KEYS[2])
if marker then
  local lane, id = string.match(marker, '^(%S+) (%S+)$')
  if not lane then return 0 end
  local stream = ARGV[4] .. lane
  if type_of(stream) == 'stream' then
    local taken = redis.pcall('XPENDING', stream, ARGV[5], id, id, 1)  -- an error: no group, no worker yet
    if type(taken) == 'table' and taken[1] then return 0 end
    redis.call('XDEL', stream, id)
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
if not unanswerable(KEYS[3]) then
  redis.call('XADD', KEYS[3], '*', 'result', ARGV[1])
  redis.call('SADD', KEYS[4], ARGV[3])
end
return 1
