-- Close an open round by deadline (beat's sweep) or by hand. Safe to run twice at once.
-- KEYS[1] meta hash   KEYS[2] round hash   KEYS[3] next round hash
-- KEYS[4] events stream   KEYS[5] deadlines zset   KEYS[6] leases zset
-- ARGV[1..5] prelude convention
-- ARGV[6] mode: 'deadline' or 'manual'   ARGV[7] lease deadline if the aggregation fires
-- Returns {status, n, epoch}; status is one of
--   fired | not_due | noop (not open) | too_few (manual) | extended | expired
local mode, lease_until = ARGV[6], tonumber(ARGV[7])
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'open' then
  redis.call('ZREM', KEYS[5], ROUND)
  return {'noop', 0, 0, state or 'missing'}
end
local r = redis.call('HMGET', KEYS[2], 'n', 'min_quorum', 'deadline', 'quorum')
local n, min_quorum, deadline = tonumber(r[1]), tonumber(r[2]) or 0, tonumber(r[3]) or 0
-- min_quorum 0 means only a full quorum may be aggregated
if min_quorum <= 0 then min_quorum = tonumber(r[4]) end
if mode == 'deadline' and (deadline == 0 or deadline > NOW) then return {'not_due', n, 0, ''} end

if n >= min_quorum then
  local epoch = fire(KEYS[2], KEYS[5], KEYS[6], KEYS[4], lease_until, n, mode)
  return {'fired', n, epoch, ''}
end
if mode == 'manual' then return {'too_few', n, 0, tostring(min_quorum)} end

local policy = redis.call('HGET', KEYS[1], 'expire_policy')
if policy == 'expire' then
  redis.call('HSET', KEYS[2], 'state', 'expired', 'closed_at', NOW)
  redis.call('ZREM', KEYS[5], ROUND)
  emit(KEYS[4], {type = 'round_expired', n = n, min_quorum = min_quorum})
  open_round(KEYS[1], KEYS[3], KEYS[5], KEYS[4], ROUND + 1)
  return {'expired', n, 0, ''}
end
-- 'extend': keep every accepted delta and wait one more period
local timeout = tonumber(redis.call('HGET', KEYS[1], 'round_timeout')) or 0
local new_deadline = NOW + timeout
redis.call('HSET', KEYS[2], 'deadline', new_deadline)
redis.call('HINCRBY', KEYS[2], 'extensions', 1)
redis.call('ZADD', KEYS[5], new_deadline, ROUND)
emit(KEYS[4], {type = 'round_extended', n = n, min_quorum = min_quorum, deadline = new_deadline})
return {'extended', n, 0, ''}
