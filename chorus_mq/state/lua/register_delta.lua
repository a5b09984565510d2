-- Register one validated delta, atomically and idempotently; fire the quorum for exactly one caller.
-- Shapes are not checked here: ingest checked the delta against the federation's declared model.
-- KEYS[1] round hash   KEYS[2] round deltas hash (client -> record)   KEYS[3] events stream
-- KEYS[4] deadlines zset   KEYS[5] leases zset (aggregations in flight)
-- KEYS[6] the inbox stream that held the record (acknowledged and deleted with an accepting verdict)
-- KEYS[7] meta hash (read: mode, latest_complete, max_staleness; buffered: current_round written)
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
-- the same transition.
-- The entry is retired here, in the same transition as its verdict (accepted, fired, duplicate), so it
-- stays pending until the verdict is stored; other replies are verdicts the caller records (judge.lua).
-- Reply {status, n, epoch, detail}; status is one of
--   accepted      registered; n deltas now
--   fired         registered, and the quorum fired: the round is aggregating under epoch
--   duplicate     this very delta was registered before (a redelivery); detail: the round's state
--   conflict      the client registered another delta in this round; detail: its sha256
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
local m = redis.call('HMGET', KEYS[7], 'mode', 'latest_complete', 'max_staleness')
local buffered = m[1] == 'buffered'
local ledger_field = client .. '|' .. sha
local function retire()
  if entry ~= '' then
    redis.call('XACK', KEYS[6], group, entry)
    redis.call('XDEL', KEYS[6], entry)
  end
end
local r = redis.call('HMGET', KEYS[1], 'state', 'n', 'sha:' .. client, 'evicted:' .. client, 'selected')
local state, n, prev, evicted, selected = r[1], tonumber(r[2]) or 0, r[3], r[4], r[5]
if not state then return reply('no_round', 0, 0, '') end

if prev then
  if prev == sha then
    emit(KEYS[3], {type = 'delta_accepted', client = client, sha256 = sha, upload_id = upload,
      n = n, duplicate = true})
    retire()
    return reply('duplicate', n, 0, state)
  end
  return reply('conflict', n, 0, prev)
end
if evicted == sha then return reply('evicted', n, 0, sha) end
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
redis.call('HSET', KEYS[2], client, record)
redis.call('HSET', KEYS[1], 'sha:' .. client, sha)
if buffered then redis.call('HSET', KEYS[11], ledger_field, ROUND) end
n = redis.call('HINCRBY', KEYS[1], 'n', 1)
emit(KEYS[3], {type = 'delta_accepted', client = client, sha256 = sha, upload_id = upload,
  n = n, quorum = quorum})
retire()
if n >= quorum then
  local epoch = fire(KEYS[1], KEYS[4], KEYS[5], KEYS[3], tonumber(ARGV[10]), n, 'quorum')
  if buffered then open_round(KEYS[7], KEYS[8], KEYS[4], KEYS[3], ROUND + 1, next_selected) end
  return reply('fired', n, epoch, '')
end
return reply('accepted', n, 0, '')
