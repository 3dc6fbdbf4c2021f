-- ROUTE: moves a read's worth of ingress entries to their pool lanes, each job once.
-- KEYS: ingress, lane...
-- ARGV: group, ttl_ms, base, space, {entry_id, lane, job_id, routed, reply}...
--   base: the shard's key base `<p>:{<tag>}:`; space: the ingress' key space under it ('' or
--   `~<tenant>:`), where the jobs' markers go; lane: the index in KEYS of the entry's lane;
--   routed: the routed job; reply: the job's reply stream path (under base).
-- Returns a code per entry: 1 moved, 0 duplicate (only acked), or the type of the key its reply
-- stream names when that is no stream.
-- requires: types, done_all
--
-- A job whose reply stream is a key of another type is neither moved nor acked: the policy
-- dead-letters it before it costs a run. A job id whose marker is set (routed before, ended at
-- the policy: COMPLETE and DEAD set it there too, or cancelled: CANCEL) is only acked. The
-- marker alone is checked, not the done key as well: that was a seventh of Redis' work per job.
-- (A marker expires before its job's done key, by the job's time in the system; a duplicate
-- submitted in between runs again, and its COMPLETE finds the done key: acked, no second
-- result.) A routed job's marker holds where its entry went, `<lane name under base> <entry
-- id>`: CANCEL deletes the entry from there while no worker has taken it. The entry is added
-- first, to know its id, and deleted again when the marker was set already: a duplicate is
-- rare, and this keeps a routed job at two commands.
local group, ttl, base, space = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local codes, ids, names = {}, {}, {}
need(KEYS[1], 'stream')
for i = 5, #ARGV, 5 do
  local pool = ARGV[i + 1]
  if not names[pool] then
    names[pool] = string.sub(KEYS[tonumber(pool)], #base + 1) .. ' '
    need(KEYS[tonumber(pool)], 'stream')
  end
end
for i = 5, #ARGV, 5 do
  local marker = base .. space .. 'routed:' .. ARGV[i + 2]
  local code = unanswerable(base .. ARGV[i + 4])
  if not code then
    ids[#ids + 1] = ARGV[i]
    code = 0
    local lane = KEYS[tonumber(ARGV[i + 1])]
    local at = redis.call('XADD', lane, '*', 'routed', ARGV[i + 3])
    if redis.call('SET', marker, names[ARGV[i + 1]] .. at, 'NX', 'PX', ttl) then
      code = 1
    else
      redis.call('XDEL', lane, at)  -- a duplicate (rare): undone before anyone can read it
    end
  end
  codes[#codes + 1] = code
end
done_all(KEYS[1], group, ids)
return codes
