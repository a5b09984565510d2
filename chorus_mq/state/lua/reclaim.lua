-- Take over an aggregation whose lease ran out (its worker died or hung): bump the epoch so
-- the old run can no longer finalize, and extend the lease for the new run.
-- KEYS[1] round hash   KEYS[2] leases zset   KEYS[3] events stream
-- ARGV[1..5] prelude convention   ARGV[6] new lease deadline
-- Reply {status, n, epoch, detail}; status is one of
--   reclaimed  epoch: the new one, for the run the caller enqueues
--   not_due    the lease has not run out; epoch: the current one
--   noop       the round is not aggregating (its lease entry, if any, is dropped)
local lease_until = tonumber(ARGV[6])
local bad = wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'zset'}, {KEYS[3], 'stream'}})
if bad then return bad end
local r = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'epoch', 'n')
if r[1] ~= 'aggregating' then
  redis.call('ZREM', KEYS[2], ROUND)
  return reply('noop', r[4], r[3], r[1] or 'missing')
end
if (tonumber(r[2]) or 0) > NOW then return reply('not_due', r[4], r[3], '') end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HINCRBY', KEYS[1], 'reclaims', 1)
push_lease(KEYS[1], KEYS[2], r[2], lease_until)  -- it ran out (not_due above): this pushes it on
emit(KEYS[3], {type = 'round_aggregating', epoch = epoch, reason = 'lease_expired'})
return reply('reclaimed', r[4], epoch, '')
