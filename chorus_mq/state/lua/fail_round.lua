-- Give up on an aggregation that cannot succeed, so the federation moves on instead of wedging.
-- KEYS[1..8] the transition keys (see the prelude)
-- ARGV[1..5] prelude convention
-- ARGV[6] epoch the caller aggregated under   ARGV[7] reason (shown to users)
-- Reply {status, n, epoch, detail}; status is one of
--   ok         the round failed; the next one is open
--   stale      another epoch holds the round; epoch: that one
--   bad_state  the round is not aggregating; detail: its state ('missing' when there is none)
local epoch, reason = tonumber(ARGV[6]), ARGV[7]
local bad = transition_keys_wrong()
if bad then return bad end
local r = redis.call('HMGET', KEYS[2], 'state', 'epoch', 'n')
if r[1] ~= 'aggregating' then return reply('bad_state', r[3], r[2], r[1] or 'missing') end
if tonumber(r[2]) ~= epoch then return reply('stale', r[3], r[2], '') end
local selected = draw(KEYS[1], KEYS[8], KEYS[7], ROUND + 1)
redis.call('HSET', KEYS[2], 'state', 'failed', 'failed_at', NOW, 'reason', reason)
redis.call('ZREM', KEYS[6], ROUND)
emit(KEYS[4], {type = 'round_failed', reason = reason, epoch = epoch})
open_round(KEYS[1], KEYS[3], KEYS[5], KEYS[4], ROUND + 1, selected)
return reply('ok', r[3], epoch, '')
