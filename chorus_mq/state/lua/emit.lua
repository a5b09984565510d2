-- Append one event to the federation's stream and publish it.
-- KEYS[1] events stream
-- ARGV[1..5] prelude convention   ARGV[6] event (JSON object; type and fields set by the caller)
-- Returns the stream id.
return emit(KEYS[1], cjson.decode(ARGV[6]))
