-- An aggregation's lease ran out and no task of the round is waiting in the broker: its task
-- message may have been lost (a Redis restart, a worker killed holding it). Before a reclaim
-- costs an attempt and a new epoch, the caller re-sends the same epoch's missing tasks once per
-- step of progress; only a re-send that went nowhere (no plan stored, no shard recorded since)
-- makes this answer 'stuck', and the caller reclaims. The outputs are write-once and the epoch
-- fences finalize, so a re-sent task that races a slow original is harmless.
-- KEYS[1] round hash   KEYS[2] leases zset   KEYS[3] round plan (string)   KEYS[4] round shards hash
-- ARGV[1..5] prelude convention   ARGV[6] new lease deadline
-- Reply {status, n, epoch, detail}; status is one of
--   resend    the lease is extended under the same epoch: re-send its missing tasks; detail: progress
--   stuck     the last re-send of this epoch made no progress: reclaim (or fail) instead
--   not_due   the lease has not run out (another sweep acted first)
--   noop      the round is not aggregating (its lease entry, if any, is dropped); detail: its state
local lease_until = tonumber(ARGV[6])
local bad = wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'zset'}, {KEYS[3], 'string'}, {KEYS[4], 'hash'}})
if bad then return bad end
local r = redis.call('HMGET', KEYS[1], 'state', 'lease_until', 'epoch', 'n', 'resend_mark')
if r[1] ~= 'aggregating' then
  redis.call('ZREM', KEYS[2], ROUND)
  return reply('noop', r[4], r[3], r[1] or 'missing')
end
if (tonumber(r[2]) or 0) > NOW then return reply('not_due', r[4], r[3], '') end
-- progress: the plan stored, then each shard recorded (monotone and bounded: so are the re-sends)
local progress = redis.call('EXISTS', KEYS[3]) + redis.call('HLEN', KEYS[4])
local mark = tostring(r[3]) .. ':' .. progress
if r[5] == mark then return reply('stuck', r[4], r[3], progress) end
redis.call('HSET', KEYS[1], 'resend_mark', mark)
redis.call('HINCRBY', KEYS[1], 'resends', 1)
push_lease(KEYS[1], KEYS[2], r[2], lease_until)  -- it ran out (not_due above): this pushes it on
return reply('resend', r[4], r[3], progress)
