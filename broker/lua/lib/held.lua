-- The entries of `ids` that `consumer` holds, as a set ('' = not fenced: all of them).
-- One XPENDING reads what the consumer holds, up to twice as many entries as `ids`: all of
-- it when its jobs end together (one call instead of one per entry). A consumer holding more
-- (long jobs ending one at a time) has the rest of `ids` checked one by one.
-- requires: owns
local function held(stream, group, ids, consumer)
  local set = {}
  if consumer == '' then
    for _, id in ipairs(ids) do set[id] = true end
    return set
  end
  local cap = 2 * #ids
  local page = redis.call('XPENDING', stream, group, '-', '+', cap, consumer)
  for _, p in ipairs(page) do set[p[1]] = true end
  if #page == cap then
    for _, id in ipairs(ids) do
      if not set[id] and owns(stream, group, id, consumer) then set[id] = true end
    end
  end
  return set
end
