-- Take over an aggregation whose lease ran out (its worker died or hung): bump the epoch so
-- the old run can no longer finalize, and extend the lease for the new run.
-- KEYS[1] round hash   KEYS[2] leases zset   KEYS[3] events stream
-- ARGV[1..5] prelude convention   ARGV[6] new lease deadline
-- Returns {status, epoch}; status is one of reclaimed | not_due | noop
local lease_until = tonumber(ARGV[6])
local r = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'epoch')
if r[1] ~= 'aggregating' then
  redis.call('ZREM', KEYS[2], ROUND)
  return {'noop', tonumber(r[3]) or 0}
end
if tonumber(r[2]) > NOW then return {'not_due', tonumber(r[3])} end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'lease_until', lease_until)
redis.call('HINCRBY', KEYS[1], 'reclaims', 1)
redis.call('ZADD', KEYS[2], lease_until, ROUND)
emit(KEYS[3], {type = 'round_aggregating', epoch = epoch, reason = 'lease_expired'})
return {'reclaimed', epoch}
