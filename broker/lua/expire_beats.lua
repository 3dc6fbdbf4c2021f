-- EXPIRE_BEATS: deletes the heartbeat fields whose beat is older than `oldest`, or not a beat
-- at all. Read and deleted in one step: a role that beats again meanwhile keeps its fresh beat.
-- KEYS: heartbeats...
-- ARGV: oldest
--   heartbeats: hashes of beats by role name; oldest: the oldest beat time kept (epoch seconds).
-- Returns how many fields were deleted.
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
