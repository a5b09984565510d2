-- Record the verdict on one inbox entry that was not accepted, and retire the entry, atomically: the
-- entry stays pending in the inbox's consumer group until this runs, so a worker or Redis dying
-- before it leaves the entry to be claimed and judged again; after it, nothing is left to redo.
-- KEYS[1] the client's inbox stream   KEYS[2] events stream   KEYS[3] the federation's dropped counts hash
-- KEYS[4] the round's rejections hash (client|code -> count, last:client -> the last verdict, JSON)
-- ARGV[1..5] prelude convention
-- ARGV[6] entry id ('' when the verdict is for no inbox entry)   ARGV[7] consumer group
-- ARGV[8] mode: 'drop' (the sender is not established: count under the code, publish nothing) or
--         'reject' (tell the client: the first rejection per client, round and code is published,
--         repeats are counted in KEYS[4] and in KEYS[3] as '<code>_repeats')
-- ARGV[9] code (snake_case)   ARGV[10] client id ('' for drops)   ARGV[11] event (JSON object, reject mode)
-- Reply {status, n, epoch, detail}; status is one of
--   judged     the entry was judged before (it is no longer pending): nothing was changed
--   dropped    counted; n: the count under the code
--   published  the rejection event was published; n: 1
--   counted    a repeat: counted, not published; n: the repeats of this client, round and code so far
local entry, group, mode, code, client = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local bad = wrong_type({{KEYS[1], 'stream'}, {KEYS[2], 'stream'}, {KEYS[3], 'hash'}, {KEYS[4], 'hash'}})
if bad then return bad end
if entry ~= '' then
  local acked = redis.call('XACK', KEYS[1], group, entry)
  redis.call('XDEL', KEYS[1], entry)
  if acked == 0 then return reply('judged', 0, 0, '') end
end
if mode == 'drop' then
  return reply('dropped', redis.call('HINCRBY', KEYS[3], code, 1), 0, '')
end
local ev = cjson.decode(ARGV[11])
ev['type'] = 'delta_rejected'
local n = redis.call('HINCRBY', KEYS[4], client .. '|' .. code, 1)
redis.call('HSET', KEYS[4], 'last:' .. client, cjson.encode({upload_id = ev['upload_id'], code = code,
  reason = ev['reason'], count = n}))
if n > 1 then
  redis.call('HINCRBY', KEYS[3], code .. '_repeats', 1)
  return reply('counted', n, 0, '')
end
emit(KEYS[2], ev)
return reply('published', 1, 0, '')
