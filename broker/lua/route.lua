-- ROUTE: moves a read's worth of ingress entries to their pool lanes, each job once.
-- KEYS: ingress, lane...
-- ARGV: group, ttl_ms, base, {entry_id, lane, job_id, routed, reply}...
--   base: the deployment's key base `<p>:{<p>}:`; lane: the index in KEYS of the entry's lane;
--   routed: the routed job; reply: the job's reply stream name (under base).
-- Returns a code per entry: 1 moved, 0 duplicate (only acked), or the type of the key its reply
-- stream names when that is no stream.
-- requires: types, done_all
--
-- A job whose reply stream is a key of another type is neither moved nor acked: the policy
-- dead-letters it before it costs a run. A job id whose marker is set (routed before, or ended
-- at the policy: COMPLETE and DEAD set it there too) is only acked. The marker alone is
-- checked, not the done key as well: that was a seventh of Redis' work per job. (A marker
-- expires before its job's done key, by the job's time in the system; a duplicate submitted in
-- between runs again, and its COMPLETE finds the done key: acked, no second result.)
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
