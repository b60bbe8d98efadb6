-- settle_v1.lua: end one admitted request (tail_service rate limiter). Idempotent.
--
-- KEYS (same hash tag {<subject>}): for the key bucket then the key-per-model bucket, 3 each:
--   tokamt (HASH "a:"..id -> tokens, "s:"..id -> settled marker), toktotal (STRING), conc (ZSET).
-- ARGV: 1 request id, 2 used tokens ("" = keep the reservation), 3..4 key has tpm / conc ("1"/"0"),
--   5..6 model has tpm / conc.
-- While the request's token entry is still held (admit purges it once it left the window), its amount becomes the used tokens
-- and the running total moves by the difference; the entry is then marked settled so a second call
-- changes nothing. The concurrency lease is removed. Returns the number of buckets changed.

local id = ARGV[1]
local used = ARGV[2]
local changed = 0

for b = 0, 1 do
  local k = b * 3
  if ARGV[3 + b * 2] == '1' then
    local hkey, skey = KEYS[k + 1], KEYS[k + 2]
    local old = redis.call('HGET', hkey, 'a:' .. id)
    if old and redis.call('HEXISTS', hkey, 's:' .. id) == 0 then
      if used ~= '' then
        local delta = tonumber(used) - tonumber(old)
        redis.call('HSET', hkey, 'a:' .. id, used)
        local total = redis.call('GET', skey)
        if total then
          -- INCRBY keeps the key's TTL; never let the total go below zero
          redis.call('INCRBY', skey, math.max(delta, -tonumber(total)))
        end
      end
      redis.call('HSET', hkey, 's:' .. id, 1)
      changed = changed + 1
    end
  end
  if ARGV[4 + b * 2] == '1' then
    changed = changed + redis.call('ZREM', KEYS[k + 3], id)
  end
end
return changed
