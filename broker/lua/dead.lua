-- DEAD: dead-letters one entry and acks it; for a known job, its failed result is its outcome.
-- KEYS: stream, dead[, done, reply_stream, replies[, routed]]
-- ARGV: group, entry_id, consumer, letter[, result, ttl_ms, reply]
--   consumer: '' = not fenced; done, routed: the job's done key and routed marker (the policy
--   passes the marker, see ROUTE); result: the job's failed result; reply: the reply stream name.
-- Returns 1 dead-lettered, 0 duplicate (the job had an outcome: only acked), -1 fenced.
-- requires: single, types
--
-- With a known job its failed result claims the done key first: a job that already has an
-- outcome gets no dead letter, only the ack. A reply stream that is a key of another type gets
-- no result (the done key still does): the dead letter is the job's outcome.
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
