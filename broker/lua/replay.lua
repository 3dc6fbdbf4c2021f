-- REPLAY: puts a dead job back on the ingress under its id, forgetting its earlier outcome.
-- KEYS: dead, ingress, done, routed
-- ARGV: entry_id, job
--   entry_id: the dead letter's; done, routed: the job's done key and routed marker.
-- Returns 1 replayed, 0 the dead letter was gone.
-- requires: types
need(KEYS[2], 'stream')
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('XADD', KEYS[2], '*', 'job', ARGV[2])
return 1
