-- The fence: whether `consumer` holds entry `id` ('' = not fenced: always).
local function owns(stream, group, id, consumer)
  if consumer == '' then return true end
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return p[1] ~= nil and p[1][2] == consumer
end
