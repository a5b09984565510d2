-- Close an open round by deadline (beat's sweep) or by hand. Safe to run twice at once.
-- KEYS[1..8] the transition keys (see the prelude: meta, round, next round, events, deadlines,
--   leases, clients, secrets)
-- ARGV[1..5] prelude convention
-- ARGV[6] mode: 'deadline' or 'manual'   ARGV[7] lease deadline if the aggregation fires
-- Reply {status, n, epoch, detail}; status is one of
--   fired     aggregating under epoch (n deltas)
--   not_due   deadline mode, and the deadline has not passed (or the round has none)
--   noop      the round is not open; detail: its state ('missing' when there is no such round)
--   too_few   manual mode, fewer than min-quorum deltas; detail: the min-quorum
--   extended  deadline passed with too few deltas, policy 'extend': one more period (a sampled buffered
--             federation's buffer drawn again)
--   expired   deadline passed with too few deltas, policy 'expire': the next round is open
local mode, lease_until = ARGV[6], tonumber(ARGV[7])
local bad = transition_keys_wrong()
if bad then return bad end
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'open' then
  redis.call('ZREM', KEYS[5], ROUND)
  return reply('noop', 0, 0, state or 'missing')
end
local r = redis.call('HMGET', KEYS[2], 'n', 'min_quorum', 'deadline', 'quorum')
local n, min_quorum, deadline = tonumber(r[1]) or 0, tonumber(r[2]) or 0, tonumber(r[3]) or 0
-- min_quorum 0 means only a full quorum may be aggregated
if min_quorum <= 0 then min_quorum = tonumber(r[4]) end
if mode == 'deadline' and (deadline == 0 or deadline > NOW) then return reply('not_due', n, 0, '') end

if n >= min_quorum then
  local buffered = redis.call('HGET', KEYS[1], 'mode') == 'buffered'
  local selected = nil
  if buffered then selected = draw(KEYS[1], KEYS[8], KEYS[7], ROUND + 1) end
  local epoch = fire(KEYS[2], KEYS[5], KEYS[6], KEYS[4], lease_until, n, mode)
  -- buffered: the next buffer opens as this one flushes (see register_delta.lua)
  if buffered then open_round(KEYS[1], KEYS[3], KEYS[5], KEYS[4], ROUND + 1, selected) end
  return reply('fired', n, epoch, '')
end
if mode == 'manual' then return reply('too_few', n, 0, min_quorum) end

local policy = redis.call('HGET', KEYS[1], 'expire_policy')
if policy == 'expire' then
  local selected = draw(KEYS[1], KEYS[8], KEYS[7], ROUND + 1)
  redis.call('HSET', KEYS[2], 'state', 'expired', 'closed_at', NOW)
  redis.call('ZREM', KEYS[5], ROUND)
  emit(KEYS[4], {type = 'round_expired', n = n, min_quorum = min_quorum})
  open_round(KEYS[1], KEYS[3], KEYS[5], KEYS[4], ROUND + 1, selected)
  return reply('expired', n, 0, '')
end
-- 'extend': keep every accepted delta and wait one more period. A buffered federation that samples its
-- clients draws the buffer again (under 'r.e', e the extension: selection.redraw_label), so drawn clients
-- that stay away cannot hold it; the deltas it holds stay.
local m = redis.call('HMGET', KEYS[1], 'round_timeout', 'mode', 'clients_per_round')
local timeout = tonumber(m[1]) or 0
local redrawn, redraw = nil, m[2] == 'buffered' and (tonumber(m[3]) or 0) > 0
local extensions = (tonumber(redis.call('HGET', KEYS[2], 'extensions')) or 0) + 1
if redraw then
  redrawn = draw(KEYS[1], KEYS[8], KEYS[7], ROUND .. '.' .. extensions)  -- before the first write
end
local new_deadline = NOW + timeout
redis.call('HSET', KEYS[2], 'deadline', new_deadline)
redis.call('HINCRBY', KEYS[2], 'extensions', 1)
redis.call('ZADD', KEYS[5], new_deadline, ROUND)
local ev = {type = 'round_extended', n = n, min_quorum = min_quorum, deadline = new_deadline}
if redrawn then
  redis.call('HSET', KEYS[2], 'selected', cjson.encode(redrawn))
  ev['selected'] = redrawn
elseif redraw then
  redis.call('HDEL', KEYS[2], 'selected')  -- fewer active clients than the sample: open to all of them
end
emit(KEYS[4], ev)
return reply('extended', n, 0, '')
