-- Give up on an aggregation that cannot succeed, so the federation moves on instead of wedging.
-- KEYS[1] meta hash   KEYS[2] round hash   KEYS[3] next round hash
-- KEYS[4] events stream   KEYS[5] deadlines zset   KEYS[6] leases zset
-- ARGV[1..5] prelude convention
-- ARGV[6] epoch the caller aggregated under   ARGV[7] reason (shown to users)
-- Returns {status, detail}; status is one of ok | stale | bad_state
local epoch, reason = ARGV[6], ARGV[7]
local r = redis.call('HMGET', KEYS[2], 'state', 'epoch')
if r[1] ~= 'aggregating' then return {'bad_state', r[1] or 'missing'} end
if r[2] ~= epoch then return {'stale', r[2]} end
redis.call('HSET', KEYS[2], 'state', 'failed', 'failed_at', NOW, 'reason', reason)
redis.call('ZREM', KEYS[6], ROUND)
emit(KEYS[4], {type = 'round_failed', reason = reason, epoch = tonumber(epoch)})
open_round(KEYS[1], KEYS[3], KEYS[5], KEYS[4], ROUND + 1)
return {'ok', epoch}
