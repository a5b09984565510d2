-- The operator gives up on a round: an open or aggregating round becomes 'aborted' under a new
-- epoch (a running aggregation can no longer commit), and the next round opens.
-- KEYS[1..8] the transition keys (see the prelude)
-- ARGV[1..5] prelude convention   ARGV[6] reason (shown to users)
-- Reply {status, n, epoch, detail}; status is one of
--   aborted    done; epoch: the new one
--   bad_state  the round already ended; detail: its state
--   no_round   no such round
local reason = ARGV[6]
local bad = transition_keys_wrong()
if bad then return bad end
local r = redis.call('HMGET', KEYS[2], 'state', 'n', 'epoch')
if not r[1] then return reply('no_round', 0, 0, '') end
if r[1] ~= 'open' and r[1] ~= 'aggregating' then return reply('bad_state', r[2], r[3], r[1]) end
local selected = draw(KEYS[1], KEYS[8], KEYS[7], ROUND + 1)
local epoch = redis.call('HINCRBY', KEYS[2], 'epoch', 1)
redis.call('HSET', KEYS[2], 'state', 'aborted', 'aborted_at', NOW, 'reason', reason)
redis.call('ZREM', KEYS[5], ROUND)
redis.call('ZREM', KEYS[6], ROUND)
emit(KEYS[4], {type = 'round_aborted', reason = reason, epoch = epoch, was = r[1], n = tonumber(r[2])})
open_round(KEYS[1], KEYS[3], KEYS[5], KEYS[4], ROUND + 1, selected)
return reply('aborted', r[2], epoch, '')
