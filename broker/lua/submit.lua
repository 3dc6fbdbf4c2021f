-- SUBMIT: adds jobs to the ingress in order while its backlog is under the limit.
-- KEYS: ingress
-- ARGV: max_backlog, job...
-- Returns {ids of the jobs added, the backlog found full when it refused the rest (else -1)}.
-- (XLEN fails on an ingress of another type before any write.)
local limit = tonumber(ARGV[1])
local backlog = redis.call('XLEN', KEYS[1])
local ids = {}
for i = 2, #ARGV do
  if backlog >= limit then return {ids, backlog} end
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'job', ARGV[i])
  backlog = backlog + 1
end
return {ids, -1}
