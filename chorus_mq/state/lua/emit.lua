-- Append one event to the federation's stream and publish it.
-- KEYS[1] events stream
-- ARGV[1..5] prelude convention   ARGV[6] event (JSON object; type and fields set by the caller)
-- Reply {status, n, epoch, detail}: ok, detail the stream id
local bad = wrong_type({{KEYS[1], 'stream'}})
if bad then return bad end
return reply('ok', 0, 0, emit(KEYS[1], cjson.decode(ARGV[6])))
