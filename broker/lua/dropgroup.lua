-- DROPGROUP: destroys a group if none of its consumers has read for `idle_ms` (or it has none):
-- checked and done in one step, so a consumer that reads meanwhile keeps its group.
-- KEYS: stream
-- ARGV: group, idle_ms
-- Returns 1 if destroyed.
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  for i = 1, #c, 2 do
    if c[i] == 'idle' and c[i + 1] < tonumber(ARGV[2]) then return 0 end
  end
end
return redis.call('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
