-- A running task of an aggregating round keeps its lease alive (never shortening it).
-- KEYS[1] round hash   KEYS[2] leases zset
-- ARGV[1..5] prelude convention   ARGV[6] the epoch the task runs under   ARGV[7] new lease deadline
-- Reply {status, n, epoch, detail}; status is one of
--   renewed    the lease ends no sooner than ARGV[7]; detail: when it ends
--   stale      another epoch holds the round (the task was reclaimed: it should stop); epoch: that one
--   bad_state  the round is not aggregating; detail: its state
local epoch, lease_until = tonumber(ARGV[6]), tonumber(ARGV[7])
local bad = wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'zset'}})
if bad then return bad end
local r = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'lease_until', 'n')
if r[1] ~= 'aggregating' then return reply('bad_state', r[4], r[2], r[1] or 'missing') end
if tonumber(r[2]) ~= epoch then return reply('stale', r[4], r[2], '') end
return reply('renewed', r[4], epoch, push_lease(KEYS[1], KEYS[2], r[3], lease_until))
