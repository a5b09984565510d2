-- The sweep found the lease of an aggregating round run out while the fleet is busy (its task is
-- queued, not lost): push the lease on without bumping the epoch.
-- KEYS[1] round hash   KEYS[2] leases zset
-- ARGV[1..5] prelude convention   ARGV[6] new lease deadline
-- Reply {status, n, epoch, detail}; status is one of
--   extended  the lease ends no sooner than ARGV[6]; detail: when it ends
--   noop      the round is not aggregating (its lease entry, if any, is dropped); detail: its state
local lease_until = tonumber(ARGV[6])
local bad = wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'zset'}})
if bad then return bad end
local r = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'lease_until', 'n')
if r[1] ~= 'aggregating' then
  redis.call('ZREM', KEYS[2], ROUND)
  return reply('noop', r[4], r[2], r[1] or 'missing')
end
local current = push_lease(KEYS[1], KEYS[2], r[3], lease_until)
redis.call('HINCRBY', KEYS[1], 'lease_extensions', 1)
return reply('extended', r[4], r[2], current)
