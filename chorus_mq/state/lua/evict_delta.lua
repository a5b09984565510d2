-- The operator removes one client's delta from an open round (n - 1). The same delta cannot be
-- registered in this round again (a redelivered message stays out); another delta of the client can.
-- KEYS[1] round hash   KEYS[2] round deltas hash   KEYS[3] events stream
-- ARGV[1..5] prelude convention   ARGV[6] client id   ARGV[7] reason (shown to users)
-- Reply {status, n, epoch, detail}; status is one of
--   evicted   done; n deltas left; detail: the evicted sha256
--   noop      the client has no delta in this round
--   closed    the round is not open; detail: its state
--   no_round  no such round
local client, reason = ARGV[6], ARGV[7]
local bad = wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'hash'}, {KEYS[3], 'stream'}})
if bad then return bad end
local r = redis.call('HMGET', KEYS[1], 'state', 'n', 'epoch', 'sha:' .. client)
if not r[1] then return reply('no_round', 0, 0, '') end
if r[1] ~= 'open' then return reply('closed', r[2], r[3], r[1]) end
local sha = r[4]
if not sha then return reply('noop', r[2], r[3], '') end
redis.call('HDEL', KEYS[1], 'sha:' .. client)
redis.call('HSET', KEYS[1], 'evicted:' .. client, sha)
redis.call('HDEL', KEYS[2], client)
local n = redis.call('HINCRBY', KEYS[1], 'n', -1)
emit(KEYS[3], {type = 'delta_evicted', client = client, sha256 = sha, reason = reason, n = n})
return reply('evicted', n, r[3], sha)
