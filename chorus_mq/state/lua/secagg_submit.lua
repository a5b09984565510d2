-- Store one client's (already verified) message for the current secure-aggregation phase.
-- KEYS[1] the round's secagg state hash   KEYS[2] the phase's submissions hash (client -> payload)
-- KEYS[3] the phase's members set (who may submit in it)
-- ARGV[1..5] prelude convention   ARGV[6] phase   ARGV[7] client id   ARGV[8] payload (JSON)
-- Reply {status, n, epoch, detail}; n: submissions so far; epoch: the phase's epoch; status is one of
--   accepted      stored
--   fired         stored, and every member has now submitted: the phase may close at quorum
--   duplicate     the client already submitted in this phase: nothing was changed
--   stale         the round is not in this phase (detail: the phase it is in): nothing was changed
--   closed        the phase's deadline has passed (it closes on the next sweep): nothing was changed
--   not_selected  the client is not a member of this phase: nothing was changed
--   no_round      no secure aggregation was opened for the round
local phase, client = ARGV[6], ARGV[7]
local bad = wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'hash'}, {KEYS[3], 'set'}})
if bad then return bad end
local state = redis.call('HMGET', KEYS[1], 'phase', 'epoch', 'deadline')
if not state[1] then return reply('no_round', 0, 0, '') end
local epoch = tonumber(state[2])
if state[1] ~= phase then return reply('stale', 0, epoch, state[1]) end
if NOW > tonumber(state[3]) then return reply('closed', 0, epoch, '') end
if redis.call('SISMEMBER', KEYS[3], client) == 0 then return reply('not_selected', 0, epoch, '') end
if redis.call('HSETNX', KEYS[2], client, ARGV[8]) == 0 then return reply('duplicate', 0, epoch, '') end
local n = redis.call('HLEN', KEYS[2])
if n >= redis.call('SCARD', KEYS[3]) then return reply('fired', n, epoch, '') end
return reply('accepted', n, epoch, '')
