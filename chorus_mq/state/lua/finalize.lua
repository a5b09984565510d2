-- Commit an aggregation: compare-and-set on the round's epoch (the fencing token), then open the next round.
-- KEYS[1] meta hash   KEYS[2] round hash   KEYS[3] next round hash
-- KEYS[4] events stream   KEYS[5] deadlines zset   KEYS[6] leases zset
-- ARGV[1..5] prelude convention
-- ARGV[6] epoch the caller aggregated under   ARGV[7] manifest object key
-- ARGV[8] result summary (JSON object, merged into the round_complete event)
-- Returns {status, detail}; status is one of ok | already | stale | bad_state
local epoch, manifest = ARGV[6], ARGV[7]
local r = redis.call('HMGET', KEYS[2], 'state', 'epoch')
if r[1] == 'complete' then return {'already', r[2]} end
if r[1] ~= 'aggregating' then return {'bad_state', r[1] or 'missing'} end
if r[2] ~= epoch then return {'stale', r[2]} end

local ev = cjson.decode(ARGV[8])
redis.call('HSET', KEYS[2], 'state', 'complete', 'completed_at', NOW, 'manifest', manifest,
  'manifest_sha256', ev['manifest_sha256'] or '')
redis.call('ZREM', KEYS[6], ROUND)
redis.call('HSET', KEYS[1], 'latest_complete', ROUND)
ev['type'] = 'round_complete'
ev['manifest'] = manifest
ev['epoch'] = tonumber(epoch)
emit(KEYS[4], ev)
open_round(KEYS[1], KEYS[3], KEYS[5], KEYS[4], ROUND + 1)
return {'ok', epoch}
