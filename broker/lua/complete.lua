-- COMPLETE: publishes a batch of jobs' results and acks their entries, each job once.
-- KEYS: stream, replies
-- ARGV: group, consumer, ttl_ms, base, mark, {entry_id, space, job_id, reply, result}...
--   stream: where the entries are, read by group; replies: the set of reply stream names;
--   consumer: '' = not fenced; base: the shard's key base `<p>:{<tag>}:`; mark: '1' to set
--   the job's routed marker too (outcomes at the policy, see ROUTE); space: the job's key space
--   under base ('' or `~<tenant>:`), where its done key and marker are; reply: its reply stream
--   path (under base).
-- Returns a code per entry: 1 done, 0 duplicate (only acked), -1 fenced, or the type of the key
-- its reply stream names when that is no stream.
-- requires: held, types, done_all
--
-- The done key holds the result: the first writer wins and later ones only ack. A fenced
-- entry (pending under another consumer, or no longer pending) is left alone. An entry whose
-- reply stream is a key of another type gets that type's name as its code, with nothing
-- written and the entry left pending: its caller dead-letters it (DEAD). The check comes
-- before the done key's: a duplicate is then only acked by DEAD.
local group, consumer, ttl, base, mark = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1'
local codes, ids, told, all = {}, {}, {}, {}
for i = 6, #ARGV, 5 do all[#all + 1] = ARGV[i] end
local mine = held(KEYS[1], group, all, consumer)
need(KEYS[1], 'stream')
need(KEYS[2], 'set')
for i = 6, #ARGV, 5 do
  local id, job, reply, result = ARGV[i], base .. ARGV[i + 1], ARGV[i + 3], ARGV[i + 4]
  local code = -1
  if mine[id] then
    code = unanswerable(base .. reply)
    if not code then
      ids[#ids + 1] = id
      code = 0
      if redis.call('SET', job .. 'done:' .. ARGV[i + 2], result, 'NX', 'PX', ttl) then
        if mark then redis.call('SET', job .. 'routed:' .. ARGV[i + 2], '1', 'PX', ttl) end
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
