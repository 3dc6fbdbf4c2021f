-- Checks for the keys a script writes to, made before its first write. A write in a script
-- meets one error that checking can foresee: WRONGTYPE, a key of another type in its place.
-- (Redis refuses a script for low memory, a failed disk write or a read-only replica at its
-- first write, before anything is written.) `need` raises for a key of the broker's own:
-- nothing can be done for the job until an operator fixes it, and the entry stays pending.
-- A reply stream is named by the job, so `unanswerable` only reports it (cached per call):
-- the job's outcome is then a dead letter. SET never fails (NX on a key of another type is
-- a refusal, not an error), so done keys and markers need no check.
local function type_of(key) return redis.call('TYPE', key)['ok'] end
local function need(key, kind)
  local t = type_of(key)
  if t ~= kind and t ~= 'none' then
    error({err = 'WRONGTYPE ' .. key .. ' is a ' .. t .. ', not a ' .. kind .. '; nothing was written'})
  end
end
local refused = {}
local function unanswerable(key)
  local t = refused[key]
  if t == nil then
    t = type_of(key)
    if t == 'stream' or t == 'none' then t = false end
    refused[key] = t
  end
  return t
end
