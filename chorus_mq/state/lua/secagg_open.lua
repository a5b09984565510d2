-- Open the secure-aggregation phases of round ROUND: the cohort is fixed here, once.
-- KEYS[1] the round's secagg state hash   KEYS[2] the advertise phase's members set   KEYS[3] events stream
-- ARGV[1..5] prelude convention   ARGV[6] threshold T   ARGV[7] seconds each phase may stay open
-- ARGV[8] the cohort (JSON list of client ids, the operator's choice)
-- ARGV[9] optional: the round's public parameters (JSON object: length, K, T, graph seed, weights), stored
--   as field 'params' and carried by the advertise event, so every client derives the same SecAggParams
-- Reply {status, n, epoch, detail}; status is one of
--   created  the state is written, phase 'advertise', epoch 1; n: the cohort size; detail: the deadline
--   exists   the round's secure aggregation was opened before: nothing was changed
local bad = wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'set'}, {KEYS[3], 'stream'}})
if bad then return bad end
if redis.call('EXISTS', KEYS[1]) == 1 then return reply('exists', 0, 0, '') end
local cohort = cjson.decode(ARGV[8])
local secs = tonumber(ARGV[7])
local deadline = NOW + secs
redis.call('HSET', KEYS[1], 'phase', 'advertise', 'epoch', 1, 'threshold', tonumber(ARGV[6]),
  'phase_seconds', secs, 'deadline', deadline, 'cohort', #cohort, 'opened_at', NOW)
for _, c in ipairs(cohort) do redis.call('SADD', KEYS[2], c) end
local ev = {type = 'secagg_phase', phase = 'advertise', epoch = 1, members = #cohort, deadline = deadline}
if ARGV[9] and ARGV[9] ~= '' then
  redis.call('HSET', KEYS[1], 'params', ARGV[9])
  ev['params'] = cjson.decode(ARGV[9])
end
emit(KEYS[3], ev)
return reply('created', #cohort, 1, tostring(deadline))
