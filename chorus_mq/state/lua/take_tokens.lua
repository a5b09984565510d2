-- A client's rate budget: a token bucket of `burst` tokens refilled at `rate` per second. Take up to
-- `want` tokens; records beyond what was granted are dropped by the caller (counted, not queued).
-- KEYS[1] the client's bucket hash (tokens, at)
-- ARGV[1..5] prelude convention (ARGV[3]: now)   ARGV[6] rate (tokens/s)   ARGV[7] burst   ARGV[8] want
-- Reply {status, n, epoch, detail}: ok, n the tokens granted (0..want)
local rate, burst, want = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local bad = wrong_type({{KEYS[1], 'hash'}})
if bad then return bad end
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(b[1]) or burst, tonumber(b[2]) or NOW
if NOW > at then tokens = math.min(burst, tokens + (NOW - at) * rate) end
local granted = math.min(want, math.floor(tokens))
if granted < 0 then granted = 0 end
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(math.max(NOW, at)))
-- a full bucket needs no key: it expires once it would have refilled
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return reply('ok', granted, 0, '')
