-- Record one shard's result of an aggregating round (write-once per shard); the one call that
-- completes the set is told so, and enqueues the commit. No chords: this counter is the join.
-- KEYS[1] round hash   KEYS[2] round shards hash (index -> result JSON)   KEYS[3] events stream
-- ARGV[1..5] prelude convention
-- ARGV[6] shard index   ARGV[7] shard count   ARGV[8] result (JSON)
-- ARGV[9] the epoch the shard ran under (the fencing token: a run the sweep reclaimed is ignored)
-- Reply {status, n, epoch, detail}; n: shards done; status is one of
--   recorded   stored; detail 'last' for exactly the call that completed the set, else ''
--   duplicate  this shard's result was stored before (a redelivery or a reclaimed run): unchanged
--   conflict   the round was split into another number of shards; detail: that number
--   stale      the round is not aggregating (detail: its state), or it is under another epoch than
--              ARGV[9] (detail 'epoch'; epoch: the current one): nothing stored
local k, total, result, epoch = ARGV[6], tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local bad = wrong_type({{KEYS[1], 'hash'}, {KEYS[2], 'hash'}, {KEYS[3], 'stream'}})
if bad then return bad end
local r = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'shards')
local done = redis.call('HLEN', KEYS[2])
if r[1] ~= 'aggregating' then return reply('stale', done, r[2], r[1] or 'missing') end
if tonumber(r[2]) ~= epoch then return reply('stale', done, r[2], 'epoch') end
if r[3] and tonumber(r[3]) ~= total then return reply('conflict', done, r[2], r[3]) end
if redis.call('HSETNX', KEYS[2], k, result) == 0 then return reply('duplicate', done, r[2], '') end
if not r[3] then redis.call('HSET', KEYS[1], 'shards', total) end
done = done + 1
emit(KEYS[3], {type = 'shard_done', shard = tonumber(k), done = done, total = total})
local last = ''
if done == total then last = 'last' end
return reply('recorded', done, r[2], last)
