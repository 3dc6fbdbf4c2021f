-- REAP: deletes a reply stream if it is empty, no group reads it, and nothing was added to it
-- since `since_ms`; then forgets its name.
-- KEYS: reply_stream, replies
-- ARGV: reply, since_ms
--   replies: the set of reply stream names; reply: the stream's name there.
-- Returns 1 if reaped.
--
-- In one step with COMPLETE and DEAD, which add a result and the name together: a result that
-- arrives meanwhile is kept, and so is the name.
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
