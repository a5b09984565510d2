-- Shared prelude, prepended to every script by chorus_mq.state.scripts.
-- Convention for every script: ARGV[1]=federation, ARGV[2]=round, ARGV[3]=now (unix s),
-- ARGV[4]=events stream MAXLEN (approximate), ARGV[5]=pub/sub channel.
-- Events go to the stream first (replayable) and are then PUBLISHed (a wake-up only).

local FED, ROUND, NOW = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local MAXLEN, CHANNEL = ARGV[4], ARGV[5]

local function emit(stream, ev)
  ev['federation'] = FED
  ev['ts'] = NOW
  if ev['round'] == nil then ev['round'] = ROUND end
  local data = cjson.encode(ev)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', MAXLEN, '*', 'data', data)
  redis.call('PUBLISH', CHANNEL, data)
  return id
end

-- Open round r: copy the federation's quorum settings, arm its deadline, make it current.
local function open_round(meta, rkey, deadlines, stream, r)
  local q = redis.call('HMGET', meta, 'quorum', 'min_quorum', 'round_timeout')
  local timeout = tonumber(q[3]) or 0
  local deadline = 0
  if timeout > 0 then
    deadline = NOW + timeout
    redis.call('ZADD', deadlines, deadline, r)
  end
  redis.call('HSET', rkey, 'state', 'open', 'epoch', 0, 'n', 0, 'quorum', q[1],
    'min_quorum', q[2], 'opened_at', NOW, 'deadline', deadline)
  redis.call('HSET', meta, 'current_round', r)
  emit(stream, {type = 'round_opened', round = r, quorum = tonumber(q[1]), deadline = deadline})
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
