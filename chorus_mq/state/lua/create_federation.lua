-- Create a federation and open round 1. Idempotent: an existing federation is left alone.
-- KEYS[1] meta hash            KEYS[2] round 1 hash
-- KEYS[3] events stream        KEYS[4] deadlines zset (member = round, score = deadline)
-- ARGV[1..5] prelude convention (round = 1)
-- ARGV[6..] field/value pairs of the federation's settings
-- Returns 1 when created, 0 when it already existed.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 6, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'created_at', NOW, 'latest_complete', 0)
emit(KEYS[3], {type = 'federation_created', round = 0})
open_round(KEYS[1], KEYS[2], KEYS[4], KEYS[3], 1)
return 1
