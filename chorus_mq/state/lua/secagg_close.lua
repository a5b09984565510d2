-- Close the current secure-aggregation phase (at quorum or deadline), fenced by its epoch: fix who
-- goes on, hand each client what it must read next, and open the next phase; or abort the round's
-- secure aggregation when fewer than T are left (or the caller says it cannot go on).
-- KEYS[1] the round's secagg state hash   KEYS[2] the closing phase's submissions hash
-- KEYS[3] the closing phase's members set   KEYS[4] the next phase's members set   KEYS[5] events stream
-- KEYS[6..] the per-client delivery hashes written by this transition (readable by that client only)
-- ARGV[1..5] prelude convention   ARGV[6] the closing phase   ARGV[7] its epoch (the fence)
-- ARGV[8] mode: 'quorum' (every member submitted), 'deadline' (NOW >= deadline), 'enough' (the unmask phase
--   only: the caller checked that the named members' stored responses reconstruct every mask left in the sum;
--   never aborts: fewer than T named is not_due) or 'abort'
-- ARGV[9] the next phase's members (JSON list; '' for every client that submitted); each must have submitted
-- ARGV[10] deliveries (JSON list aligned with KEYS[6..]: an object field -> value for each)
-- ARGV[11] the next phase's name   ARGV[12] reason (abort mode; recorded and published)
-- Reply {status, n, epoch, detail}; status is one of
--   ok        the next phase is open; n: its members; epoch: its epoch; detail: its name
--   aborted   the state is 'aborted' (too few left, or mode 'abort'); detail: why
--   stale     the round is not in that phase and epoch (another worker closed it): nothing was changed
--   not_due   quorum mode before every member submitted, deadline mode before the deadline, enough mode outside
--             the unmask phase or with fewer than T members named
--   conflict  a named next member did not submit in the closing phase: nothing was changed
--   no_round  no secure aggregation was opened for the round
local phase, fence, mode, nextphase = ARGV[6], tonumber(ARGV[7]), ARGV[8], ARGV[11]
local expected = {{KEYS[1], 'hash'}, {KEYS[2], 'hash'}, {KEYS[3], 'set'}, {KEYS[4], 'set'}, {KEYS[5], 'stream'}}
for i = 6, #KEYS do expected[#expected + 1] = {KEYS[i], 'hash'} end
local bad = wrong_type(expected)
if bad then return bad end
local state = redis.call('HMGET', KEYS[1], 'phase', 'epoch', 'deadline', 'threshold', 'phase_seconds')
if not state[1] then return reply('no_round', 0, 0, '') end
local epoch = tonumber(state[2])
if state[1] ~= phase or epoch ~= fence then return reply('stale', 0, epoch, state[1]) end
local n = redis.call('HLEN', KEYS[2])
if mode == 'quorum' and n < redis.call('SCARD', KEYS[3]) then return reply('not_due', n, epoch, '') end
if mode == 'deadline' and NOW < tonumber(state[3]) then return reply('not_due', n, epoch, '') end
if mode == 'enough' and (phase ~= 'unmask' or ARGV[9] == '') then return reply('not_due', n, epoch, '') end

local function abort(why)
  redis.call('HSET', KEYS[1], 'phase', 'aborted', 'epoch', epoch + 1, 'reason', why, 'aborted_at', NOW)
  emit(KEYS[5], {type = 'secagg_phase', phase = 'aborted', epoch = epoch + 1, closed = phase, reason = why})
  return reply('aborted', 0, epoch + 1, why)
end
if mode == 'abort' then return abort(ARGV[12]) end

local members
if ARGV[9] == '' then
  members = redis.call('HKEYS', KEYS[2])
else
  members = cjson.decode(ARGV[9])
  for _, c in ipairs(members) do
    if redis.call('HEXISTS', KEYS[2], c) == 0 then return reply('conflict', 0, epoch, c) end
  end
end
local threshold = tonumber(state[4])
if mode == 'enough' and #members < threshold then return reply('not_due', n, epoch, '') end
if #members < threshold then
  return abort(#members .. ' clients left after ' .. phase .. ', fewer than the threshold ' .. threshold)
end
for _, c in ipairs(members) do redis.call('SADD', KEYS[4], c) end
local deliveries = cjson.decode(ARGV[10])
for i = 6, #KEYS do
  local fields = deliveries[i - 5]
  for f, v in pairs(fields) do redis.call('HSET', KEYS[i], f, v) end
end
local deadline = NOW + tonumber(state[5])
redis.call('HSET', KEYS[1], 'phase', nextphase, 'epoch', epoch + 1, 'deadline', deadline,
  phase .. '_closed_by', mode, phase .. '_members', n)
if nextphase == 'unmask' then redis.call('HSET', KEYS[1], 'survivors', cjson.encode(members)) end
emit(KEYS[5], {type = 'secagg_phase', phase = nextphase, epoch = epoch + 1, closed = phase, closed_by = mode,
  members = #members, deadline = deadline})
return reply('ok', #members, epoch + 1, nextphase)
