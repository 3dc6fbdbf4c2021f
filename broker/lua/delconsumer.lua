-- DELCONSUMER: removes a consumer only if it holds no pending entry *now*: checked and done in
-- one step, so an entry delivered in between is not lost.
-- KEYS: stream
-- ARGV: group, consumer
-- Returns -1 kept (it holds entries), else XGROUP DELCONSUMER's reply.
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
