-- NACK: gives an entry back for a later delivery, recording why its delivery failed.
-- KEYS: stream, error_key
-- ARGV: group, entry_id, consumer, idle_ms, error, ttl_ms, delivery
--   idle_ms: the idle time to set; error: '' = none (nothing recorded); delivery: the delivery
--   that failed.
-- Returns 1 given back, -1 fenced.
-- requires: single
--
-- Marking the entry idle for `idle_ms` makes it claimable by any consumer after
-- (claim_idle - idle) ms. JUSTID leaves the delivery count alone: it rises when the entry is
-- claimed, i.e. when it is really delivered again. The error key (a hash) says which delivery
-- failed and how: a delivery with no error there ended with its worker's death, which is no
-- evidence against the job (see broker.reclaim).
if not owned(KEYS[1]) then return -1 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[4], 'JUSTID')
if ARGV[5] ~= '' then
  redis.call('DEL', KEYS[2])  -- it may be a plain string, as earlier versions wrote it
  redis.call('HSET', KEYS[2], 'error', ARGV[5], 'delivery', ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
return 1
