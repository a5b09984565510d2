-- Register one validated delta, atomically and idempotently; fire the quorum for exactly one caller.
-- Shapes are not checked here: ingest checked the delta against the federation's declared model.
-- KEYS[1] round hash   KEYS[2] round deltas hash (client -> record)   KEYS[3] events stream
-- KEYS[4] deadlines zset   KEYS[5] leases zset (aggregations in flight)
-- KEYS[6] the inbox stream that held the record (acknowledged and deleted with an accepting verdict)
-- KEYS[7] meta hash (read: mode, latest_complete, max_staleness, max_per_client_per_flush; buffered:
--   current_round written)
-- KEYS[8] next round hash (buffered: the buffer opened when this one fires)
-- KEYS[9] clients hash, KEYS[10] secrets hash (read: the next buffer's draw)
-- KEYS[11] buffered ledger hash ('client|sha256' -> the round that took it: no delta in two flushes)
-- ARGV[1..5] prelude convention
-- ARGV[6] client id   ARGV[7] sha256   ARGV[8] record (JSON)   ARGV[9] upload id
-- ARGV[10] lease deadline if this call fires the quorum
-- ARGV[11] the inbox entry id ('' for none)   ARGV[12] the inbox consumer group
-- ARGV[13] buffered: the version the delta was trained from ('' for none)
-- A buffered federation (meta mode 'buffered'): a round is a buffer; a delta whose base version is not yet
-- published, or more than max_staleness versions behind latest_complete, is refused; a delta the ledger
-- holds from another buffer is a duplicate; at the quorum (K) the buffer fires and the next one opens in
-- the same transition. A client may hold up to max_per_client_per_flush deltas in one buffer: its k-th is
-- registered under the term 'client' (k = 1) or 'client#k' (k >= 2; '#' is in no client id), in the round
-- hash's 'sha:<term>' and the deltas hash alike; a synchronous round holds one per client.
-- The entry is retired here, in the same transition as its verdict (accepted, fired, duplicate), so it
-- stays pending until the verdict is stored; other replies are verdicts the caller records (judge.lua).
-- Reply {status, n, epoch, detail}; status is one of
--   accepted      registered; n deltas now
--   fired         registered, and the quorum fired: the round is aggregating under epoch
--   duplicate     this very delta was registered before (a redelivery); detail: the round's state
--   conflict      the client holds its allowance of other deltas in this round; detail: the last one's sha256
--   evicted       the operator evicted this very delta from this round; detail: its sha256
--   closed        the round is not open; detail: its state
--   not_selected  the round drew its clients and this one is not among them
--   no_round      no such round
--   stale         buffered: the base version is more than max_staleness behind; detail: latest_complete
--   future_base   buffered: the base version is not published yet; detail: latest_complete
--   no_base       buffered: the upload names no base version; detail: latest_complete
local client, sha, record, upload = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local entry, group = ARGV[11] or '', ARGV[12] or ''
local bad = wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'hash'}, {KEYS[3], 'stream'}, {KEYS[4], 'zset'},
  {KEYS[5], 'zset'}, {KEYS[6], 'stream'}, {KEYS[7], 'hash'}, {KEYS[8], 'hash'}, {KEYS[11], 'hash'}})
if bad then return bad end
local m = redis.call('HMGET', KEYS[7], 'mode', 'latest_complete', 'max_staleness', 'max_per_client_per_flush')
local buffered = m[1] == 'buffered'
local allowance = 1
if buffered then allowance = math.max(tonumber(m[4]) or 1, 1) end
local ledger_field = client .. '|' .. sha
local function retire()
  if entry ~= '' then
    redis.call('XACK', KEYS[6], group, entry)
    redis.call('XDEL', KEYS[6], entry)
  end
end
local r = redis.call('HMGET', KEYS[1], 'state', 'n', 'selected')
local state, n, selected = r[1], tonumber(r[2]) or 0, r[3]
if not state then return reply('no_round', 0, 0, '') end

-- the client's terms in this round: the first free one takes the delta (operator-sized: the allowance)
local term, prev, evicted = nil, nil, false
for k = 1, allowance do
  local name = client
  if k > 1 then name = client .. '#' .. k end
  local held = redis.call('HMGET', KEYS[1], 'sha:' .. name, 'evicted:' .. name)
  if held[1] == sha then
    emit(KEYS[3], {type = 'delta_accepted', client = client, sha256 = sha, upload_id = upload,
      n = n, duplicate = true})
    retire()
    return reply('duplicate', n, 0, state)
  end
  if held[2] == sha then evicted = true end
  if held[1] then prev = held[1] elseif not term then term = name end
end
if not term then return reply('conflict', n, 0, prev) end
if evicted then return reply('evicted', n, 0, sha) end
if buffered then
  local took = redis.call('HGET', KEYS[11], ledger_field)
  if took then
    retire()
    return reply('duplicate', n, 0, 'round ' .. took)
  end
end
if state ~= 'open' then return reply('closed', n, 0, state) end
if buffered then
  local latest, base = tonumber(m[2]) or 0, tonumber(ARGV[13] or '')
  if not base then return reply('no_base', n, 0, latest) end
  if base > latest then return reply('future_base', n, 0, latest) end
  if latest - base > (tonumber(m[3]) or 0) then return reply('stale', n, 0, latest) end
end
if selected then
  -- the draw's K names (operator-sized), not anything the client sent
  local found = false
  for _, name in ipairs(cjson.decode(selected)) do
    if name == client then found = true break end
  end
  if not found then return reply('not_selected', n, 0, '') end
end

local quorum = tonumber(redis.call('HGET', KEYS[1], 'quorum'))
local next_selected = nil
if buffered and n + 1 >= quorum then
  next_selected = draw(KEYS[7], KEYS[10], KEYS[9], ROUND + 1)  -- before the first write: it may fail
end
redis.call('HSET', KEYS[2], term, record)
redis.call('HSET', KEYS[1], 'sha:' .. term, sha)
if buffered then redis.call('HSET', KEYS[11], ledger_field, ROUND) end
n = redis.call('HINCRBY', KEYS[1], 'n', 1)
emit(KEYS[3], {type = 'delta_accepted', client = client, sha256 = sha, upload_id = upload,
  n = n, quorum = quorum, term = term})
retire()
if n >= quorum then
  local epoch = fire(KEYS[1], KEYS[4], KEYS[5], KEYS[3], tonumber(ARGV[10]), n, 'quorum')
  if buffered then open_round(KEYS[7], KEYS[8], KEYS[4], KEYS[3], ROUND + 1, next_selected) end
  return reply('fired', n, epoch, '')
end
return reply('accepted', n, 0, '')
