-- Shared prelude, prepended to every script by chorus_mq.state.scripts.
-- Convention for every script: ARGV[1]=federation, ARGV[2]=round, ARGV[3]=now (unix s),
-- ARGV[4]=events stream MAXLEN (approximate), ARGV[5]=pub/sub channel.
-- Every script replies {status, n, epoch, detail} (see chorus_mq/state/protocol.py).
-- Every script checks the type of each key it writes before its first write, so a key of the
-- wrong type is a 'wrong_type' reply and never a half-done transition.
-- Events go to the stream first (replayable) and are then PUBLISHed (a wake-up only).

local FED, ROUND, NOW = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local MAXLEN, CHANNEL = ARGV[4], ARGV[5]

local function reply(status, n, epoch, detail)
  return {status, tonumber(n) or 0, tonumber(epoch) or 0, tostring(detail or '')}
end

-- An error reply when a key exists with a type other than expected; nil when every key fits.
-- expected: a list of {key, type}
local function wrong_type(expected)
  for _, e in ipairs(expected) do
    local t = redis.call('TYPE', e[1])['ok']
    if t ~= 'none' and t ~= e[2] then
      return reply('wrong_type', 0, 0, e[1] .. ' is a ' .. t .. ', not a ' .. e[2])
    end
  end
  return nil
end

local function emit(stream, ev)
  ev['federation'] = FED
  ev['ts'] = NOW
  if ev['round'] == nil then ev['round'] = ROUND end
  local data = cjson.encode(ev)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', MAXLEN, '*', 'data', data)
  redis.call('PUBLISH', CHANNEL, data)
  return id
end

-- Push round ROUND's lease on to lease_until, never shortening it: the round hash's lease_until and
-- the round's entry in the leases zset move together. current: the lease_until the caller read
-- (nil when none). Returns when the lease ends now.
local function push_lease(rkey, leases, current, lease_until)
  current = tonumber(current) or 0
  if lease_until <= current then return current end
  redis.call('HSET', rkey, 'lease_until', lease_until)
  redis.call('ZADD', leases, lease_until, ROUND)
  return lease_until
end

-- The clients of round r when the federation samples k of them: the k active (not revoked)
-- registered clients with the smallest sha1(seed .. ':' .. r .. ':' .. client), sorted by name.
-- nil (every client may take part) when k is 0 or fewer than k clients are active, e.g. for a
-- round opened before the operator registered them. O(clients): operator input, never a client's.
-- Call it before a script's first write: it only reads, and may fail.
local function draw_from(k, seed, clients, r)
  if k <= 0 then return nil end
  local flat = redis.call('HGETALL', clients)
  local ranked = {}
  for i = 1, #flat, 2 do
    local ok, rec = pcall(cjson.decode, flat[i + 1])
    if ok and type(rec) == 'table' and rec['revoked'] ~= true then
      ranked[#ranked + 1] = {h = redis.sha1hex(seed .. ':' .. r .. ':' .. flat[i]), c = flat[i]}
    end
  end
  if #ranked < k then return nil end
  table.sort(ranked, function(a, b)
    if a.h ~= b.h then return a.h < b.h end
    return a.c < b.c
  end)
  local chosen = {}
  for i = 1, k do chosen[i] = ranked[i].c end
  table.sort(chosen)
  return chosen
end

-- draw_from() with the federation's own clients_per_round and its secret seed (in the workers-only
-- secrets hash, so no client can compute a draw before its round opens; a federation created before
-- the seed moved there still has it in meta)
local function draw(meta, secrets, clients, r)
  local k = tonumber(redis.call('HGET', meta, 'clients_per_round')) or 0
  local seed = redis.call('HGET', secrets, 'selection_seed') or redis.call('HGET', meta, 'selection_seed') or ''
  return draw_from(k, seed, clients, r)
end

-- Open round r with the clients draw() chose: copy the federation's quorum settings, arm its
-- deadline, make it current. A round that exists already is left as it is: a buffered federation opens
-- the next buffer when one fires, before the fired one ends (synchronous rounds never meet one). A
-- strategy that freezes a shared factor (meta 'trainable_cycle', the comma-separated factors its rounds
-- train in turn; see chorus_mq/strategy.py) names the round's trainable factor in the round hash and the event.
local function open_round(meta, rkey, deadlines, stream, r, selected)
  if redis.call('HEXISTS', rkey, 'state') == 1 then return end
  local q = redis.call('HMGET', meta, 'quorum', 'min_quorum', 'round_timeout', 'trainable_cycle')
  local timeout = tonumber(q[3]) or 0
  local deadline = 0
  if timeout > 0 then
    deadline = NOW + timeout
    redis.call('ZADD', deadlines, deadline, r)
  end
  redis.call('HSET', rkey, 'state', 'open', 'epoch', 0, 'n', 0, 'quorum', q[1],
    'min_quorum', q[2], 'opened_at', NOW, 'deadline', deadline)
  local ev = {type = 'round_opened', round = r, quorum = tonumber(q[1]), deadline = deadline}
  if q[4] and q[4] ~= '' then
    local cycle = {}
    for factor in string.gmatch(q[4], '[^,]+') do cycle[#cycle + 1] = factor end
    ev['trainable'] = cycle[((r - 1) % #cycle) + 1]
    redis.call('HSET', rkey, 'trainable', ev['trainable'])
  end
  if selected then
    redis.call('HSET', rkey, 'selected', cjson.encode(selected))
    ev['selected'] = selected
  end
  redis.call('HSET', meta, 'current_round', r)
  emit(stream, ev)
end

-- Move an open round to 'aggregating' under a new epoch (the fencing token).
local function fire(rkey, deadlines, leases, stream, lease_until, n, reason)
  local epoch = redis.call('HINCRBY', rkey, 'epoch', 1)
  redis.call('HSET', rkey, 'state', 'aggregating', 'agg_started', NOW, 'lease_until', lease_until,
    'closed_by', reason)
  redis.call('ZREM', deadlines, ROUND)
  redis.call('ZADD', leases, lease_until, ROUND)
  emit(stream, {type = 'round_aggregating', n = n, epoch = epoch, reason = reason})
  return epoch
end

-- The keys of a transition that may end the round and open the next one:
-- KEYS[1] meta hash   KEYS[2] round hash   KEYS[3] next round hash   KEYS[4] events stream
-- KEYS[5] deadlines zset   KEYS[6] leases zset   KEYS[7] clients hash (read: the next round's draw)
-- KEYS[8] secrets hash (read: the draw's seed)
local function transition_keys_wrong()
  return wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'hash'}, {KEYS[3], 'hash'}, {KEYS[4], 'stream'},
    {KEYS[5], 'zset'}, {KEYS[6], 'zset'}, {KEYS[7], 'hash'}, {KEYS[8], 'hash'}})
end
