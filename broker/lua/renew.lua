-- RENEW: renews the lease on each entry the consumer still owns (idle back to 0, delivery
-- count unchanged).
-- KEYS: stream
-- ARGV: group, consumer, entry_id...
-- Returns the ids another consumer holds now.
--
-- An id pending nowhere was acked: most often the caller's own job, completed while this
-- renewal was on its way (not lost); if a peer completed it, the caller's own completion is
-- fenced anyway.
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
