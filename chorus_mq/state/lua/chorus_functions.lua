#!lua name=chorus
-- The Redis Function library clients append through (FUNCTION LOAD REPLACE by workers at startup,
-- see chorus_mq/state/functions.py; not a round script: no prelude). Limits are written in when it is loaded, never passed by a caller.
--
-- chorus_inbox_append: append one record to the caller's own inbox stream, bounded.
--   KEYS[1] the inbox stream (a client's ACL lets it name only its own)
--   ARGV[1] the record (one signed JSON record, stored as field RECORD_FIELD of chorus_mq/messages.py)
--   Reply: the new entry id; or an error:
--     CHORUS_TOO_LARGE  the record is longer than MAX_RECORD_BYTES
--     CHORUS_INBOX_FULL the inbox holds MAX_RECORDS entries (read or not, until the workers delete them)
--     CHORUS_USAGE      not exactly one key and one argument
-- Redis runs a function's commands with the caller's rights, so a client's user may also XADD to its
-- inbox directly: the gateway (chorus-mq redis-gateway) refuses that, and clients reach Redis only there.
local MAX_RECORD_BYTES = {{MAX_RECORD_BYTES}}
local MAX_RECORDS = {{MAX_RECORDS}}

local function inbox_append(keys, args)
  if #keys ~= 1 or #args ~= 1 then
    return redis.error_reply('CHORUS_USAGE chorus_inbox_append takes one key (the inbox) and one record')
  end
  local size = string.len(args[1])
  if size > MAX_RECORD_BYTES then
    return redis.error_reply('CHORUS_TOO_LARGE record of ' .. size .. ' bytes; at most ' .. MAX_RECORD_BYTES)
  end
  if redis.call('XLEN', keys[1]) >= MAX_RECORDS then
    return redis.error_reply('CHORUS_INBOX_FULL the inbox holds ' .. MAX_RECORDS
      .. ' records the workers have not handled yet; retry once they have')
  end
  return redis.call('XADD', keys[1], '*', '{{RECORD_FIELD}}', args[1])
end

redis.register_function('chorus_inbox_append', inbox_append)
