-- Move an open secure round to 'aggregating' once its secure aggregation is done: the unmasked sum
-- replaces the deltas a plain round counts, so n is the number of inputs in the sum.
-- KEYS[1..8] the transition keys (see the prelude: meta, round, next round, events, deadlines,
--   leases, clients, secrets)   KEYS[9] the round's secagg state hash
-- ARGV[1..5] prelude convention   ARGV[6] lease deadline of the aggregation
-- ARGV[7] the secagg epoch the caller read at 'done' (the fence against a second secure aggregation)
-- Reply {status, n, epoch, detail}; status is one of
--   fired     aggregating under epoch, n: the summed inputs
--   noop      the round is not open (already fired, complete, missing); detail: its state
--   not_done  the round's secure aggregation is not 'done' (or another epoch); detail: its phase
local lease_until, fence = tonumber(ARGV[6]), tonumber(ARGV[7])
local bad = transition_keys_wrong() or wrong_type({{KEYS[9], 'hash'}})
if bad then return bad end
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'open' then return reply('noop', 0, 0, state or 'missing') end
local sa = redis.call('HMGET', KEYS[9], 'phase', 'epoch', 'survivors')
if sa[1] ~= 'done' or tonumber(sa[2]) ~= fence then return reply('not_done', 0, 0, sa[1] or 'missing') end
local n = #cjson.decode(sa[3] or '[]')
redis.call('HSET', KEYS[2], 'n', n)
local epoch = fire(KEYS[2], KEYS[5], KEYS[6], KEYS[4], lease_until, n, 'secure_aggregation')
return reply('fired', n, epoch, '')
