-- CLAIM: one claim pass over a stream's idle pending entries (see broker.reclaim).
-- KEYS: stream
-- ARGV: group, consumer, idle_ms, cursor, count, suspects, error_prefix, crash_mark
--   suspects: how many suspects are wanted; error_prefix: '' = no suspects, else with the entry
--   id the key where a failed delivery recorded its error (see NACK); crash_mark: how the error
--   of a delivery that killed its sandbox starts.
-- Returns {cursor, entries, suspect entries, deleted ids, counts, suspect counts, suspects given
-- back}.
--
-- XAUTOCLAIM JUSTID takes ids without counting a delivery. A redelivered id is a suspect when
-- its last delivery left no error (its worker died or stalled under it), or an error that
-- starts with the crash mark (it killed the sandbox that ran it alone): up to `suspects` are
-- taken to run in a sandbox, the rest given straight back (idle, so claimable at once, count
-- unchanged). The others are taken with XCLAIM, which counts the delivery and returns their
-- fields. (The error keys share the stream's hash tag.)
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
local wanted = tonumber(ARGV[6])
local given_back = 0
local out = {{}, {}}
local counts = {{}, {}}
local function suspect(id, last)
  local kind = redis.call('TYPE', ARGV[7] .. id).ok
  if kind ~= 'hash' then return kind == 'none' end  -- a string: an error, as earlier versions wrote it
  local err = redis.call('HMGET', ARGV[7] .. id, 'error', 'delivery')
  return not err[1] or err[2] ~= tostring(last) or string.sub(err[1], 1, #ARGV[8]) == ARGV[8]
end
for _, id in ipairs(r[2]) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  local prior = 1
  if p[1] then prior = p[1][4] end
  local kind = 1
  if ARGV[7] ~= '' and prior >= 2 and suspect(id, prior) then
    if wanted > 0 then wanted = wanted - 1; kind = 2 else kind = 0 end
  end
  if kind == 0 then
    given_back = given_back + 1
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID')
  else
    local e = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
    if e[1] then
      table.insert(out[kind], e[1])
      table.insert(counts[kind], prior + 1)
    end
  end
end
return {r[1], out[1], out[2], r[3] or {}, counts[1], counts[2], given_back}
