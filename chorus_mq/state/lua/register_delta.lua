-- Register one validated delta, atomically and idempotently; fire the quorum for exactly one caller.
-- KEYS[1] meta hash       KEYS[2] round hash         KEYS[3] round deltas hash (client -> record)
-- KEYS[4] events stream   KEYS[5] deadlines zset     KEYS[6] leases zset (aggregations in flight)
-- KEYS[7] module shapes hash (module -> "d_out,d_in"), fixed by the first delta ever accepted
-- ARGV[1..5] prelude convention
-- ARGV[6] client id   ARGV[7] sha256   ARGV[8] record (JSON)   ARGV[9] upload id
-- ARGV[10] lease deadline if this call fires the quorum
-- ARGV[11..] module, "d_out,d_in" pairs of this delta
-- Returns {status, n, epoch, detail}; status is one of
--   accepted | fired | duplicate | conflict | closed | no_round | shape_mismatch
local client, sha, record, upload = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local state = redis.call('HGET', KEYS[2], 'state')
if not state then return {'no_round', 0, 0, ''} end

local prev = redis.call('HGET', KEYS[2], 'sha:' .. client)
if prev then
  local n = tonumber(redis.call('HGET', KEYS[2], 'n'))
  if prev == sha then
    emit(KEYS[4], {type = 'delta_accepted', client = client, sha256 = sha, upload_id = upload,
      n = n, duplicate = true})
    return {'duplicate', n, 0, state}
  end
  return {'conflict', n, 0, prev}
end
if state ~= 'open' then return {'closed', 0, 0, state} end

for i = 11, #ARGV, 2 do
  local known = redis.call('HGET', KEYS[7], ARGV[i])
  if known and known ~= ARGV[i + 1] then
    return {'shape_mismatch', 0, 0, ARGV[i] .. ' is ' .. ARGV[i + 1] .. ' but the federation has ' .. known}
  end
end
for i = 11, #ARGV, 2 do redis.call('HSETNX', KEYS[7], ARGV[i], ARGV[i + 1]) end

redis.call('HSET', KEYS[3], client, record)
redis.call('HSET', KEYS[2], 'sha:' .. client, sha)
local n = redis.call('HINCRBY', KEYS[2], 'n', 1)
local quorum = tonumber(redis.call('HGET', KEYS[2], 'quorum'))
emit(KEYS[4], {type = 'delta_accepted', client = client, sha256 = sha, upload_id = upload,
  n = n, quorum = quorum})
if n >= quorum then
  local epoch = fire(KEYS[2], KEYS[5], KEYS[6], KEYS[4], tonumber(ARGV[10]), n, 'quorum')
  return {'fired', n, epoch, ''}
end
return {'accepted', n, 0, ''}
