-- Create a federation and open round 1. Idempotent: an existing federation is left untouched.
-- KEYS[1] meta hash   KEYS[2] modules hash   KEYS[3] extras hash   KEYS[4] inbox stream
-- KEYS[5] events stream   KEYS[6] deadlines zset   KEYS[7] clients hash   KEYS[8] secrets hash
-- KEYS[9] round 0 hash   KEYS[10] round 1 hash
-- ARGV[1..5] prelude convention (round = 1)
-- ARGV[6] selection seed (secret: kept in the secrets hash)   ARGV[7] DP noise key (secret)   ARGV[8] inbox consumer group
-- ARGV[9] initial adapter's manifest key ('' = none)   ARGV[10] its sha256
-- ARGV[11] clients per round (also among the config pairs; here so round 1 is drawn before any write)
-- ARGV[12] C, ARGV[13] M, ARGV[14] X: how many config, module and extra pairs follow, in that order:
--   C config field/value pairs, M module/"d_out,d_in" pairs, X extra/"d0,d1,..." pairs (operator input)
-- Reply: created | exists (n and epoch 0)
-- The inbox stream gets its consumer group at id 0. With an initial adapter, round 0 is 'complete'
-- with that manifest (latest_complete stays 0, as without one).
local bad = wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'hash'}, {KEYS[3], 'hash'}, {KEYS[4], 'stream'},
  {KEYS[5], 'stream'}, {KEYS[6], 'zset'}, {KEYS[7], 'hash'}, {KEYS[8], 'hash'}, {KEYS[9], 'hash'},
  {KEYS[10], 'hash'}})
if bad then return bad end
if redis.call('EXISTS', KEYS[1]) == 1 then return reply('exists', 0, 0, '') end

local seed, noise_key, group = ARGV[6], ARGV[7], ARGV[8]
local initial, initial_sha = ARGV[9], ARGV[10]
local n_cfg, n_mod, n_extra = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local selected = draw_from(tonumber(ARGV[11]) or 0, seed, KEYS[7], 1)

-- first write: the only one that can fail for another reason than a key's type
local made = redis.pcall('XGROUP', 'CREATE', KEYS[4], group, '0', 'MKSTREAM')
if type(made) == 'table' and made['err'] and not string.find(made['err'], 'BUSYGROUP', 1, true) then
  return redis.error_reply(made['err'])
end
local function put_pairs(key, from, count)
  for i = from, from + 2 * count - 1, 2 do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
  return from + 2 * count
end
local at = put_pairs(KEYS[1], 15, n_cfg)
at = put_pairs(KEYS[2], at, n_mod)
put_pairs(KEYS[3], at, n_extra)
redis.call('HSET', KEYS[1], 'created_at', NOW, 'latest_complete', 0)
redis.call('HSETNX', KEYS[8], 'noise_key', noise_key)
redis.call('HSETNX', KEYS[8], 'selection_seed', seed)
if initial ~= '' then
  redis.call('HSET', KEYS[9], 'state', 'complete', 'epoch', 0, 'n', 0, 'quorum', 0, 'min_quorum', 0,
    'opened_at', NOW, 'deadline', 0, 'completed_at', NOW, 'manifest', initial, 'manifest_sha256', initial_sha)
end
emit(KEYS[5], {type = 'federation_created', round = 0, initial = initial})
open_round(KEYS[1], KEYS[10], KEYS[6], KEYS[5], 1, selected)
return reply('created', 0, 0, '')
