-- Commit an aggregation: compare-and-set on the round's epoch (the fencing token), then open the next round.
-- KEYS[1..8] the transition keys (see the prelude)
-- ARGV[1..5] prelude convention
-- ARGV[6] epoch the caller aggregated under   ARGV[7] manifest object key   ARGV[8] manifest sha256
-- ARGV[9] result summary (JSON object, merged into the round_complete event)
-- Reply {status, n, epoch, detail}; status is one of
--   ok         committed; the next round is open
--   already    the round was committed before; epoch: the one it was committed under
--   stale      another epoch holds the round; epoch: that one
--   bad_state  the round is not aggregating; detail: its state ('missing' when there is none)
local epoch, manifest, manifest_sha = tonumber(ARGV[6]), ARGV[7], ARGV[8]
local bad = transition_keys_wrong()
if bad then return bad end
local r = redis.call('HMGET', KEYS[2], 'state', 'epoch', 'n')
if r[1] == 'complete' then return reply('already', r[3], r[2], '') end
if r[1] ~= 'aggregating' then return reply('bad_state', r[3], r[2], r[1] or 'missing') end
if tonumber(r[2]) ~= epoch then return reply('stale', r[3], r[2], '') end

local ev = cjson.decode(ARGV[9])
local selected = draw(KEYS[1], KEYS[8], KEYS[7], ROUND + 1)
redis.call('HSET', KEYS[2], 'state', 'complete', 'completed_at', NOW, 'manifest', manifest,
  'manifest_sha256', manifest_sha)
redis.call('ZREM', KEYS[6], ROUND)
redis.call('HSET', KEYS[1], 'latest_complete', ROUND)
ev['type'] = 'round_complete'
ev['manifest'] = manifest
ev['manifest_sha256'] = manifest_sha
ev['epoch'] = epoch
emit(KEYS[4], ev)
open_round(KEYS[1], KEYS[3], KEYS[5], KEYS[4], ROUND + 1, selected)
return reply('ok', r[3], epoch, '')
