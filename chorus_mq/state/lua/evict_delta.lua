-- The operator removes one client's deltas from an open round (n - 1 per delta: a buffered client may hold
-- several, under the terms 'client' and 'client#k', see register_delta.lua). The same deltas cannot be
-- registered in this round again (a redelivered message stays out); another delta of the client can.
-- KEYS[1] round hash   KEYS[2] round deltas hash   KEYS[3] events stream
-- ARGV[1..5] prelude convention   ARGV[6] client id   ARGV[7] reason (shown to users)
-- Reply {status, n, epoch, detail}; status is one of
--   evicted   done; n deltas left; detail: the evicted sha256s, comma-separated, by term
--   noop      the client has no delta in this round
--   closed    the round is not open; detail: its state
--   no_round  no such round
local client, reason = ARGV[6], ARGV[7]
local bad = wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'hash'}, {KEYS[3], 'stream'}})
if bad then return bad end
local r = redis.call('HMGET', KEYS[1], 'state', 'n', 'epoch')
if not r[1] then return reply('no_round', 0, 0, '') end
if r[1] ~= 'open' then return reply('closed', r[2], r[3], r[1]) end
-- the round hash holds K terms at most (operator-sized), and a few fixed fields
local own, prefix = 'sha:' .. client, 'sha:' .. client .. '#'
local terms = {}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if field == own or field:sub(1, #prefix) == prefix then terms[#terms + 1] = field:sub(5) end
end
if #terms == 0 then return reply('noop', r[2], r[3], '') end
table.sort(terms)
local n, shas = tonumber(r[2]) or 0, {}
for _, term in ipairs(terms) do
  local sha = redis.call('HGET', KEYS[1], 'sha:' .. term)
  redis.call('HDEL', KEYS[1], 'sha:' .. term)
  redis.call('HSET', KEYS[1], 'evicted:' .. term, sha)
  redis.call('HDEL', KEYS[2], term)
  n = redis.call('HINCRBY', KEYS[1], 'n', -1)
  emit(KEYS[3], {type = 'delta_evicted', client = client, sha256 = sha, reason = reason, n = n})
  shas[#shas + 1] = sha
end
return reply('evicted', n, r[3], table.concat(shas, ','))
