-- The single-entry scripts' helpers, for a layout that starts ARGV: group, entry_id, consumer.
-- requires: owns
local function owned(stream) return owns(stream, ARGV[1], ARGV[2], ARGV[3]) end
local function done_with(stream)
  redis.call('XACK', stream, ARGV[1], ARGV[2])
  redis.call('XDEL', stream, ARGV[2])
end
